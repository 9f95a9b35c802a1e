"""Learning on the generated world: USL from a (short) pre-training demo export with the USL demo recipe.

Measured with the full demo export (usl/README.md): mAP 2.9% -> 6.0% in 100 iterations. The generated
cameras differ far more than the people, so the starting features cluster by camera and cross-camera
retrieval starts at chance. The test asserts a 1.5x rise of mAP and purer clusters (ARI over the clustered
samples) in the last epochs than in the first, and prints the ARI per epoch (over all samples, outliers as
one class, it rises for 5-6 epochs and falls back as more images become outliers).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.usl import UslConfig, run_usl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pretrain_export(tmp_path_factory, synthetic_world: Path) -> Path:
    """The pre-training demo cut to one epoch (12 iterations) on the world's pool: a backbone export."""
    from passreid.pretrain.config import PretrainConfig
    from passreid.pretrain.trainer import run_pretraining

    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml",
                      [f"train.output_dir={out}", f"data.root={synthetic_world}", "train.epochs=1",
                       "optim.warmup_epochs=1", "monitor.period=0", "data.num_workers=0", "train.device=cpu",
                       "train.precision=fp32"])
    result = run_pretraining(cfg, resume=False)
    return Path(result.backbone)


@pytest.mark.slow
def test_usl_from_the_pretrain_export_raises_map(tmp_path: Path, synthetic_world: Path, pretrain_export: Path):
    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml",
                      [f"train.output_dir={tmp_path}", f"data.world_dir={synthetic_world}",
                       f"model.pretrained={pretrain_export}", "eval.period=10"])
    result = run_usl(cfg, resume=False)
    start, end = result.initial_metrics["mAP"], result.final_metrics["mAP"]
    ari = [round(record["ari"], 3) for record in result.history]
    ari_clustered = [round(record["ari_clustered"], 3) for record in result.history]
    print(f"USL demo: mAP {start:.4f} -> {end:.4f}; ARI per epoch {ari}; ARI of clustered samples {ari_clustered}")
    assert len(result.history) == 10 and all(record["clusters"] >= 1 for record in result.history)
    assert end >= 1.5 * start, f"mAP {start:.4f} -> {end:.4f}"
    # The clusters that form get purer: ARI over the clustered samples, last three epochs vs the first.
    assert sum(ari_clustered[-3:]) / 3 > ari_clustered[0], ari_clustered
