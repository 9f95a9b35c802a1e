"""The Cluster-Contrast loop end to end on the generated world: outputs, exact resume, finetune/test.py
compatibility of model_final.pth, the published feature handling with "last" and "best (test-set selected)"
reported, and a 2-process gloo run against one process."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ports import free_port
from _spawn import leave_group_after, start_workers, wait_for_workers

from passreid.config import load_config
from passreid.engine import warmup_step_lr
from passreid.usl import UslConfig, run_usl

REPO = Path(__file__).resolve().parents[1]


# A tiny, fast run: vit_tiny at 64x32, random init, 2 epochs of 3 iterations, batches of 16.
FAST = ["model.pretrained=none", "model.img_size=[64,32]", "model.drop_path_rate=0.0", "data.batch_size=16", "data.num_instances=4",
        "data.test_batch_size=64", "train.epochs=2", "train.iters=3", "train.log_period=1", "eval.period=1",
        "train.eval_at_start=false", "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.7"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: Path, world: Path, *extra: str) -> UslConfig:
    return load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml",
                       [f"train.output_dir={out}", f"data.root={world}/market", *FAST, *extra])


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.endswith("_seconds")} for record in history]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_outputs_resume_and_finetune_test_compatibility(tmp_path: Path, synthetic_world: Path):
    full = run_usl(_config(tmp_path / "full", synthetic_world), resume=False)
    assert full.final_model is not None and full.iterations == 6 and full.epochs_completed == 2
    assert [record["epoch"] for record in full.history] == [1, 2]
    for record in full.history:
        assert record["clusters"] >= 1 and 0.0 <= record["purity"] <= 1.0 and "ari" in record and "loss" in record
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "cluster"] == [1, 2]
    assert len([r for r in records if r["split"] == "eval"]) == 2
    # schedules.npz: the published per-epoch step schedule, one row per iteration, each group at its multiple.
    lr = np.load(tmp_path / "full" / "schedules.npz")["lr"]
    cfg = _config(tmp_path / "full", synthetic_world)
    optim = cfg.optim
    expected = np.repeat([warmup_step_lr(epoch, optim.lr, optim.step_size, optim.gamma, optim.warmup_epochs,
                                         optim.lr * optim.warmup_lr_factor) for epoch in range(2)], 3)
    assert lr.shape[0] == 6 and np.allclose(lr.min(axis=1), expected, rtol=1e-12, atol=0)
    assert [r["lr"] for r in records if r["split"] == "train"] == list(lr[:, 0])

    # Mid-epoch stop (iteration 4 of 6: the checkpoint carries the epoch's pseudo labels and memory), resume.
    run_usl(_config(tmp_path / "mid", synthetic_world, "train.max_iters=4"), resume=False)
    state = torch.load(tmp_path / "mid" / "checkpoint.pth", weights_only=False)
    assert state["iteration"] == 4 and state["extra"]["epoch_state"]["epoch"] == 1
    resumed = run_usl(_config(tmp_path / "mid", synthetic_world), resume=True)
    assert resumed.iterations == 6
    _assert_same_state(_model_state(full.final_model), _model_state(resumed.final_model))
    assert _untimed(resumed.history) == _untimed(full.history) and resumed.final_metrics == full.final_metrics

    # Stop at the epoch boundary: the resumed run re-clusters from the checkpointed model.
    run_usl(_config(tmp_path / "edge", synthetic_world, "train.max_iters=3"), resume=False)
    state = torch.load(tmp_path / "edge" / "checkpoint.pth", weights_only=False)
    assert state["sampler"] == {"epoch": 1, "position": 0} and state["extra"]["epoch_state"] is None
    resumed = run_usl(_config(tmp_path / "edge", synthetic_world), resume=True)
    _assert_same_state(_model_state(full.final_model), _model_state(resumed.final_model))
    assert _untimed(resumed.history) == _untimed(full.history) and resumed.final_metrics == full.final_metrics

    # model_final.pth is a fine-tuning model file: finetune/test.py gives the run's final numbers.
    from passreid.finetune import load_finetuned_model
    from passreid.finetune.testing import run_test

    model, ft_cfg, _ = load_finetuned_model(full.final_model)
    assert model.head.classifier.weight.shape[0] == full.history[-1]["clusters"]  # the final memory
    assert ft_cfg.model.neck_feat == "after" and ft_cfg.model.normalize_necks
    outputs = run_test(full.final_model, None, tmp_path / "test")
    assert outputs.result.metrics["mAP"] == pytest.approx(full.final_metrics["mAP"], abs=1e-6)


# The published Cluster-Contrast settings the demo recipe pins back (configs/usl/demo.yaml), with the multi-neck
# (UDA) feature, whose rows are not unit-norm.
PUBLISHED = ["data.erasing=cluster_contrast", "data.test_interpolation=bicubic", "cluster.feat_norm=false",
             "eval.feat_norm=false", "model.multi_neck=true"]


@pytest.mark.slow
def test_published_features_last_and_best_reported(tmp_path: Path, synthetic_world: Path, monkeypatch):
    import passreid.cluster.jaccard as jaccard
    import passreid.eval.evaluator as evaluator

    knn_inputs, eval_calls = [], []
    knn, rank_metrics = jaccard.knn, evaluator.rank_metrics

    def knn_spy(x, k, **kwargs):
        knn_inputs.append((x.norm(dim=1), kwargs["metric"]))
        return knn(x, k, **kwargs)

    def rank_metrics_spy(query_feats, gallery_feats, *args, **kwargs):
        eval_calls.append((np.linalg.norm(query_feats, axis=1), kwargs["normalize"]))
        return rank_metrics(query_feats, gallery_feats, *args, **kwargs)

    monkeypatch.setattr(jaccard, "knn", knn_spy)
    monkeypatch.setattr(evaluator, "rank_metrics", rank_metrics_spy)
    out = tmp_path / "run"
    result = run_usl(_config(out, synthetic_world, *PUBLISHED, "train.epochs=3", "train.iters=2"), resume=False)

    # The multi-neck feature reaches the Jaccard step and the test distance as output (norms in [1, sqrt 2]).
    assert len(knn_inputs) == 3 and len(eval_calls) == 3
    for norms, metric in knn_inputs:
        assert metric == "sqeuclidean" and norms.min() > 1.0 + 1e-3 and norms.max() <= 2 ** 0.5 + 1e-4
    for norms, normalize in eval_calls:
        assert normalize is False and norms.min() > 1.0 + 1e-3

    # Last and best (test-set selected), from the run's own outputs.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    (last,) = [r for r in records if r["split"] == "last"]
    (best,) = [r for r in records if r["split"] == "best_test_selected"]
    scalars = ("mAP", "rank1", "rank5", "mINP", "epoch")
    assert [evals[-1][k] for k in scalars] == [last[k] for k in scalars] and last["epoch"] == 3
    top = max(r["mAP"] for r in evals)
    chosen = next(r for r in evals if r["mAP"] == top)  # the earlier evaluation on a tie, as published
    assert [chosen[k] for k in scalars] == [best[k] for k in scalars] and best["step"] == chosen["step"]
    assert result.final_metrics["mAP"] == last["mAP"] and result.epochs_completed == 3
    assert result.best_metrics["mAP"] == best["mAP"] and result.best_epoch == best["epoch"]
    log = (out / "log.txt").read_text()
    assert f"last (epoch 3, model_final.pth): mAP {100 * last['mAP']:.1f}%" in log
    assert (f"best (test-set selected, as the published numbers; epoch {int(best['epoch'])}): "
            f"mAP {100 * best['mAP']:.1f}%") in log
    meta = torch.load(result.final_model, weights_only=False)["meta"]
    assert meta["best_test_selected"]["epoch"] == best["epoch"] and meta["final_metrics"] == result.final_metrics
    assert torch.load(out / "checkpoint.pth", weights_only=False)["extra"]["best"]["epoch"] == best["epoch"]

    # model_final.pth carries the test settings: the inference API evaluates it the way the run did.
    from passreid.inference import load_model

    loaded = load_model(result.final_model)
    assert loaded.test_interpolation == "bicubic" and loaded.config.eval.feat_norm is False


def test_best_is_the_highest_map_and_the_earlier_on_a_tie():
    from types import SimpleNamespace

    from passreid.usl import ClusterContrastTrainer

    trainer = SimpleNamespace(best=None, epoch=0, iteration=0)
    for epoch, mAP in enumerate([0.2, 0.5, 0.5, 0.4], start=1):
        trainer.epoch, trainer.iteration = epoch, 10 * epoch
        ClusterContrastTrainer._track_best(trainer, {"mAP": mAP, "rank1": mAP})
    assert trainer.best == {"epoch": 2, "iteration": 20, "metrics": {"mAP": 0.5, "rank1": 0.5}}


def test_input_problems_found_at_clustering_or_set_up_are_user_errors(tmp_path: Path, synthetic_world: Path,
                                                                       monkeypatch):
    """DBSCAN finding no cluster, a batch that does not split over the processes and a faiss backend that is
    not installed each stop the run with a message (entry points: exit status 2), the last two before any
    feature pass."""
    from passreid.cli import user_errors
    from passreid.config import ConfigError
    from passreid.dist import DistEnv
    from passreid.usl import ClusterContrastTrainer, NoClustersError

    assert NoClustersError in user_errors()
    with pytest.raises(NoClustersError, match="found no cluster among .* raise cluster.eps"):
        run_usl(_config(tmp_path / "eps", synthetic_world, "cluster.eps=0.0001", "train.epochs=1"), resume=False)

    three = DistEnv(rank=0, world_size=3, local_rank=0, master_addr="127.0.0.1", master_port=29500,
                    source="torchrun")
    monkeypatch.setattr("passreid.engine.trainer.dist.init_distributed", lambda **_: three)
    monkeypatch.setattr(ClusterContrastTrainer, "_prepare_epoch", lambda *_: pytest.fail("got to the first epoch"))
    with pytest.raises(ConfigError, match="data.batch_size.*16 images per step do not split over 3 processes"):
        ClusterContrastTrainer(_config(tmp_path / "three", synthetic_world), resume=False)
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "faiss", None)  # ``import faiss`` raises ImportError
    with pytest.raises(ConfigError, match="cluster.knn_backend.*faiss is not installed"):
        run_usl(_config(tmp_path / "faiss", synthetic_world, "cluster.knn_backend=faiss"), resume=False)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, world_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from passreid.usl import ClusterContrastTrainer

    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml",
                      [f"train.output_dir={out_dir}/ddp", f"data.root={world_dir}/market", *FAST, *_DETERMINISTIC,
                       "train.epochs=1"])

    def train() -> None:
        trainer = ClusterContrastTrainer(cfg, resume=False)
        result = trainer.run()
        torch.save({"labels": trainer.labels, "memory": trainer.memory.features.clone(), "history": result.history,
                    "metrics": result.final_metrics,
                    "params": {k: v.clone() for k, v in trainer.model.state_dict().items()}},
                   Path(out_dir) / f"rank{rank}.pt")

    leave_group_after(train)


# No random augmentation or stochastic depth: the two runs then see the same inputs. SGD: the update is
# linear in the gradient (Adam's first steps turn float-rounding differences of near-zero gradients into +-lr).
_DETERMINISTIC = ["data.flip_p=0.0", "data.padding=0", "data.erasing_p=0.0", "data.color_jitter=[]",
                  "optim.name=sgd", "optim.lr=0.01"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_run_equals_one_process(tmp_path: Path, synthetic_world: Path):
    context = start_workers(_ddp_worker, (2, free_port(), str(tmp_path), str(synthetic_world)))
    wait_for_workers(context, 300, "2-process Cluster Contrast")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert (ranks[0]["labels"] == ranks[1]["labels"]).all()  # pseudo labels broadcast
    assert torch.equal(ranks[0]["memory"], ranks[1]["memory"])  # same memory updates on both ranks
    assert ranks[0]["metrics"] is not None and ranks[1]["metrics"] is None

    # One process over the same global batches; its BN sees each rank's half separately (ghost BN of 8).
    # One epoch: the same starting model gives the same pseudo labels (gathered in sample order), then the
    # three steps must agree. (Later epochs re-cluster features that differ by float rounding, which can move
    # a border point of DBSCAN.)
    single = run_usl(_config(tmp_path / "single", synthetic_world, *_DETERMINISTIC, "train.ghost_bn_size=8",
                             "train.epochs=1"), resume=False)
    (one,), (two,) = _untimed(single.history), _untimed(ranks[0]["history"])
    assert one.pop("loss") == pytest.approx(two.pop("loss"), rel=1e-5) and one == two
    final_file = torch.load(single.final_model, weights_only=False)
    torch.testing.assert_close(final_file["model"]["head.classifier.weight"], ranks[0]["memory"], rtol=1e-4,
                               atol=1e-5)  # the memory after the last update
    final = final_file["model"]
    for key, value in ranks[0]["params"].items():
        if not key.endswith("num_batches_tracked"):  # ghost BN counts its chunks
            torch.testing.assert_close(value, final[key], rtol=1e-4, atol=1e-5, msg=key)
    assert single.final_metrics["mAP"] == pytest.approx(ranks[0]["metrics"]["mAP"], abs=1e-3)
