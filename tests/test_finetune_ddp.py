"""Two-process (gloo) fine-tuning: distributed P x K sampler, DDP step, sharded evaluation gathered in order."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _ports import free_port
from _spawn import start_workers, wait_for_workers
import torch

REPO = Path(__file__).resolve().parents[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, world_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from passreid import dist
    from passreid.config import load_config
    from passreid.engine import unwrap_model
    from passreid.finetune import FinetuneConfig, FinetuneTrainer

    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", [
        f"train.output_dir={out_dir}/run", f"data.world_dir={world_dir}", "model.img_size=[64,32]",
        "train.max_iters=2", "train.log_period=1", "data.batch_size=32",
    ])
    try:
        trainer = FinetuneTrainer(cfg, resume=False)
        result = trainer.run()
        model = unwrap_model(trainer.model)
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        torch.save({"iterations": result.iterations, "metrics": result.final_metrics, "checksum": checksum,
                    "per_rank_batch": trainer.sampler.per_rank_batch_size,
                    "rank_indices": trainer.sampler._rank_indices(0)[:32]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_fine_tuning(tmp_path: Path, synthetic_world: Path):
    context = start_workers(_ddp_worker, (2, free_port(), str(tmp_path), str(synthetic_world)))
    wait_for_workers(context, 300, "2-process fine-tuning")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["iterations"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # DDP kept replicas equal
    assert ranks[0]["per_rank_batch"] == 16
    assert not set(ranks[0]["rank_indices"]) & set(ranks[1]["rank_indices"])  # disjoint halves of each batch
    assert ranks[0]["metrics"] is not None and ranks[1]["metrics"] is None  # rank 0 evaluates
    run = tmp_path / "run"
    assert (run / "model_final.pth").is_file() and (run / "checkpoint.pth").is_file()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["mAP"] for r in evals if r["split"] == "eval"] == [ranks[0]["metrics"]["mAP"]]
    # The gathered evaluation equals a single-process evaluation of the saved model.
    from passreid.finetune import evaluate_model, load_finetuned_model
    from passreid.finetune.data import load_test_dataset

    model, cfg, _ = load_finetuned_model(run / "model_final.pth")
    single = evaluate_model(model, load_test_dataset(cfg), (64, 32), cfg, torch.device("cpu"))
    assert single.metrics["mAP"] == pytest.approx(ranks[0]["metrics"]["mAP"], abs=1e-6)
