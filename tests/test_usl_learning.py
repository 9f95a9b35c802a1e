"""Learning on the generated world: USL from a (short) pre-training demo export with the USL demo recipe.

Issue #7: the pseudo labels' adjusted Rand index against the true ids (over all train images, outliers as one
class) must rise across epochs, and mAP above its start within the demo budget. The runs are not the same on
every machine: float rounding differs with the CPU's vector kernels, and the clustering amplifies it (a run
with ``ATEN_CPU_CAPABILITY=default`` equals the AVX2 run through epoch 5, then its clusters differ). The
assertions are sized by the measured spread over seeds and CPU kernels (below); the ARI rise, the mechanism,
is the robust claim; the mAP rise is small and noisy at this budget, so only its direction is asserted.
The demo recipe reads the demo's larger world (passreid.demo's ``usl_world``), as ``make demo`` does.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from passreid.config import load_config
from passreid.usl import UslConfig, run_usl

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrain_export(tmp_path_factory) -> Path:
    """The pre-training demo cut to one epoch (12 iterations) on the default world's pool: a backbone export.

    The pool is rendered into a folder of this module (the same 400 images as the default world's: pool
    images depend on the seed and style only), so other tests' worlds are irrelevant here."""
    from passreid.demo.world import generate_world
    from passreid.pretrain.config import PretrainConfig
    from passreid.pretrain.trainer import run_pretraining

    world = generate_world(tmp_path_factory.mktemp("pool_world"), num_train_ids=1, num_test_ids=1,
                           images_per_id_per_camera=1, occluded=False, num_distractors=0, num_junk=0)
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml",
                      [f"train.output_dir={out}", f"data.root={world / 'pool'}", "train.epochs=1",
                       "optim.warmup_epochs=1", "monitor.period=0", "data.num_workers=0", "train.device=cpu",
                       "train.precision=fp32"])
    result = run_pretraining(cfg, resume=False)
    return Path(result.backbone)


@pytest.mark.slow
def test_usl_from_the_pretrain_export_raises_map_and_ari(tmp_path: Path, pretrain_export: Path, usl_world: Path):
    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml",
                      [f"train.output_dir={tmp_path / 'usl'}", f"data.root={usl_world / 'market'}",
                       f"model.pretrained={pretrain_export}",
                       "eval.period=100"])
    result = run_usl(cfg, resume=False)
    start, end = result.initial_metrics["mAP"], result.final_metrics["mAP"]
    ari = [record["ari"] for record in result.history]
    print(f"USL demo recipe: mAP {start:.4f} -> {end:.4f}; ARI per epoch {[round(a, 3) for a in ari]}; "
          f"ARI of clustered samples {[round(r['ari_clustered'], 3) for r in result.history]}")
    assert len(result.history) == cfg.train.epochs and all(record["clusters"] >= 1 for record in result.history)
    # Measured from this one-epoch export (start 1.46%, chance level: cross-camera retrieval, usl/README.md),
    # seeds 1 and 2 (each measured in two sessions, 2-core AVX2 CPU) and seed 1 with ATEN_CPU_CAPABILITY=default:
    #   ARI first epoch 0.030 in all; mean of the last three epochs 0.129-0.142 (rise 0.10-0.11, spread 0.013);
    #   final mAP 2.51-3.47% (rise 1.05-2.01 points, spread 0.96: the seed moves it by 0.9, the CPU by 0.4).
    # The pseudo labels move towards the true ids: a rise of 0.05 is half the smallest measured rise, and its
    # margin below that rise is 4x the spread.
    assert sum(ari[-3:]) / 3 > ari[0] + 0.05, ari
    # mAP rises above its start: +0.5 point is half the smallest measured rise (the spread is as large as the
    # rise itself, so no larger factor is asserted).
    assert end - start >= 0.005, f"mAP {start:.4f} -> {end:.4f}"
