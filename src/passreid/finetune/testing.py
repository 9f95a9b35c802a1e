"""Evaluate a fine-tuned checkpoint on a config's test set (what ``finetune/test.py`` runs).

Writes into the output directory ``metrics.json`` (Rank-1/5/10, mAP, mINP as fractions, the full
CMC, counts, re-ranking parameters when used, the weights file and the test set) and
``query_features.npz`` / ``gallery_features.npz`` (``feats`` / ``pids`` / ``camids``, the format
``tools/evaluate.py`` reads).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from passreid import dist
from passreid.engine import autocast_for, describe_precision, make_output_dir, resolve_precision, setup_logging
from passreid.finetune.checkpoints import load_finetuned_model
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.data import load_test_dataset
from passreid.finetune.evaluator import EvalResult, evaluate_model, format_result
from passreid.finetune.trainer import resolve_device

__all__ = ["EvaluationOutputs", "run_test"]

logger = logging.getLogger("passreid.finetune")

METRICS_JSON = "metrics.json"
QUERY_FEATURES = "query_features.npz"
GALLERY_FEATURES = "gallery_features.npz"


@dataclass
class EvaluationOutputs:
    """Paths written by :func:`run_test` (rank 0) and the evaluation result."""

    output_dir: Path
    metrics: Path | None
    query_features: Path | None
    gallery_features: Path | None
    result: EvalResult | None


def run_test(
    weights: str | os.PathLike,
    cfg: FinetuneConfig | None,
    output_dir: str | os.PathLike,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> EvaluationOutputs:
    """Evaluate ``weights`` on the test set of ``cfg`` (``None``: the config stored in a passreid file).

    The architecture comes from the file for passreid checkpoints and from ``cfg`` for published
    TransReID/PASS ones (see :func:`~passreid.finetune.checkpoints.load_finetuned_model`).
    """
    env = dist.init_distributed()
    out = make_output_dir(output_dir)
    setup_logging(out, rank=env.rank)
    model, model_cfg, report = load_finetuned_model(weights, cfg, allow_missing=allow_missing,
                                                    allow_unexpected=allow_unexpected)
    cfg = validate_config(cfg if cfg is not None else model_cfg)
    device = resolve_device(cfg.train.device, env.local_rank)
    model.to(device)
    dataset = load_test_dataset(cfg)
    precision = resolve_precision(device, cfg.eval.precision, "eval.precision")
    logger.info("test features on %s in %s", device, describe_precision(cfg.eval.precision, precision))
    amp = autocast_for(device, precision)
    img_size = tuple(model_cfg.model.img_size)
    result = evaluate_model(model, dataset, img_size, cfg, device, autocast=amp.autocast, rank=env.rank,
                            world_size=env.world_size)
    if result is None:
        return EvaluationOutputs(out, None, None, None, None)
    logger.info("%s on %s (%d query, %d gallery):\n%s", weights, dataset.name, len(dataset.query),
                len(dataset.gallery), format_result(result))
    record = {
        **result.to_json(),
        "weights": str(weights),
        "dataset": dataset.name,
        "dataset_root": dataset.root,
        "metric": cfg.eval.metric,
        "feature_dim": int(result.query.feats.shape[1]),
        "published_checkpoint_report": report.summary() if report is not None else None,
    }
    metrics_path = out / METRICS_JSON
    metrics_path.write_text(json.dumps(record, indent=2) + "\n")
    query_path, gallery_path = out / QUERY_FEATURES, out / GALLERY_FEATURES
    result.query.save_npz(str(query_path))
    result.gallery.save_npz(str(gallery_path))
    logger.info("wrote %s, %s, %s", metrics_path, query_path, gallery_path)
    return EvaluationOutputs(out, metrics_path, query_path, gallery_path, result)
