"""Evaluate a fine-tuned checkpoint on a config's test set: the command ``passreid-finetune-test``, also
``python finetune/test.py`` (see :func:`main`).

Writes into the output directory ``metrics.json`` (Rank-1/5/10, mAP, mINP as fractions, the full
CMC, counts, re-ranking parameters when used, the weights file and the test set) and
``query_features.npz`` / ``gallery_features.npz`` (``feats`` / ``pids`` / ``camids``, the format
``tools/evaluate.py`` reads).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from passreid import dist
from passreid.atomic_files import atomic_write_text
from passreid.cli import error_boundary
from passreid.config import (Layer, build_config, config_to_dict, default_argument_parser, overrides_to_layers,
                             parse_and_load, print_config)
from passreid.data.reid_sets import load_test_dataset
from passreid.engine import (autocast_for, describe_precision, make_output_dir, resolve_precision, select_device,
                             setup_logging)
from passreid.eval.evaluator import EvalResult, evaluate_model, format_result
from passreid.finetune.checkpoints import load_finetuned_model, stored_config
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.data import check_test_cameras
from passreid.finetune.methods import get_method
from passreid.models import CheckpointFormatError

__all__ = ["EvaluationOutputs", "main", "run_test"]

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
    TransReID/PASS ones (see :func:`~passreid.finetune.checkpoints.load_finetuned_model`). A passreid file
    also gives the method, its test distance and the test transform; ``cfg`` then chooses only the test set,
    ``eval.*`` and the device (:func:`resolve_test_config`).
    """
    minutes = (cfg if cfg is not None else FinetuneConfig()).train.dist_timeout_min
    env = dist.init_distributed(timeout=datetime.timedelta(minutes=minutes))
    out = make_output_dir(output_dir)
    setup_logging(out, rank=env.rank)
    model, model_cfg, report = load_finetuned_model(weights, cfg, allow_missing=allow_missing,
                                                    allow_unexpected=allow_unexpected)
    if report is None and cfg is not None:  # a passreid file: it says how its model reads and compares
        cfg = resolve_test_config(model_cfg, cfg, str(weights))
    cfg = validate_config(cfg if cfg is not None else model_cfg)
    device = select_device(cfg.train.device, env.local_rank)
    model.to(device)
    dataset = load_test_dataset(cfg.data)
    check_test_cameras(dataset, getattr(model, "num_cameras", 0), model_cfg.model.sie_camera)
    precision = resolve_precision(device, cfg.eval.precision, "eval.precision")
    logger.info("test features on %s in %s", device, describe_precision(cfg.eval.precision, precision))
    amp = autocast_for(device, precision)
    img_size = tuple(model_cfg.model.img_size)
    result = evaluate_model(model, dataset, img_size, cfg, device, autocast=amp.autocast, rank=env.rank,
                            world_size=env.world_size, test_distance=get_method(cfg.method).build_test_distance)
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
    atomic_write_text(metrics_path, json.dumps(record, indent=2) + "\n")
    query_path, gallery_path = out / QUERY_FEATURES, out / GALLERY_FEATURES
    result.query.save_npz(query_path, paths=[item.path for item in dataset.query])
    result.gallery.save_npz(gallery_path, paths=[item.path for item in dataset.gallery])
    logger.info("wrote %s, %s, %s", metrics_path, query_path, gallery_path)
    return EvaluationOutputs(out, metrics_path, query_path, gallery_path, result)


# What the given config decides when a passreid model file is tested: the test set, eval.* and where the run
# executes. Everything else (method, model, method sections, test transform) is how the stored model reads
# images and compares features, so it comes from the file.
GIVEN_TEST_SET_KEYS = ("dataset", "root", "test_dataset", "test_root", "max_test_ids")
GIVEN_DATA_KEYS = (*GIVEN_TEST_SET_KEYS, "test_batch_size", "num_workers")
GIVEN_TRAIN_KEYS = ("device", "dist_timeout_min")
# Data keys of the file that change test features or distances (the others are training augmentation).
TEST_READ_DATA_KEYS = ("pixel_mean", "pixel_std", "test_interpolation", "mask_preprocess")


def resolve_test_config(stored: FinetuneConfig, given: FinetuneConfig, label: str) -> FinetuneConfig:
    """The config that tests a passreid model file: ``stored`` (the file's) with the test set, ``eval.*`` and
    the device of ``given``. A warning names every given test-relevant setting the file's replaces."""
    data = replace(stored.data, **{key: getattr(given.data, key) for key in GIVEN_DATA_KEYS})
    train = replace(stored.train, **{key: getattr(given.train, key) for key in GIVEN_TRAIN_KEYS})
    merged = replace(stored, data=data, train=train, eval=given.eval)
    replaced = [f"{key}={value!r} (file: {file_value!r})"
                for key, value, file_value in _differences(config_to_dict(given), config_to_dict(merged))
                if _read_by_the_test(key)]
    if replaced:
        logger.warning("%s stores the config it was trained with: the method, model, method settings and test "
                       "transform are the file's; the test set (data.%s) and eval.* are the given config's; "
                       "given settings not used: %s", label, "/".join(GIVEN_TEST_SET_KEYS), "; ".join(replaced))
    return merged


def _read_by_the_test(key: str) -> bool:
    """Whether the dotted config ``key`` can change test features or distances."""
    section, _, name = key.partition(".")
    if section == "data":
        return name in TEST_READ_DATA_KEYS
    return section not in ("train", "optim", "loss", "eval") and key != "model.pretrained"


def _differences(given: dict, used: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, given value, used value)`` of every leaf where two config dicts differ."""
    found = []
    for key, value in given.items():
        other = used.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            found += _differences(value, other, f"{prefix}{key}.")
        elif value != other:
            found.append((f"{prefix}{key}", value, other))
    return found


TEST_COMMAND_HELP = """Evaluate a fine-tuned checkpoint on a config's test set (see finetune/README.md).

    python finetune/test.py --config-file configs/finetune/market1501/pass_vit_s_256.yaml \
        --weights runs/market_pass_s/model_final.pth --data-root /data [--output-dir D] [key=value ...]

Writes D/metrics.json, D/query_features.npz and D/gallery_features.npz (default D: <weights dir>/test).
Without --config-file, a passreid model_final.pth / checkpoint.pth is evaluated with the config stored
in it (overrides still apply). With --config-file, a passreid file is still tested with its own method, model
and test transform: the config chooses the test set, eval.* and the device (a warning names what it ignores).
Released TransReID / PASS-reID, DPM, TSD, DPEFormer and BPBReID checkpoints need the --config-file that
describes their architecture; every key that does not map is reported and refused unless allowed with
--allow-missing / --allow-unexpected (fnmatch patterns).
--print-config prints the resolved config and exits; a mistake in the input is one message and exit
status 2 (--debug adds the traceback).
"""


@error_boundary(program="finetune/test.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate ``--weights`` and write the metrics and features."""
    parser = default_argument_parser(TEST_COMMAND_HELP)
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="model_final.pth, a run's checkpoint.pth, or a released fine-tuned checkpoint")
    parser.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                        help="model keys a published checkpoint may lack")
    parser.add_argument("--allow-unexpected", nargs="*", default=[], metavar="PATTERN",
                        help="published checkpoint keys that may be left unused")
    args, cfg = parse_and_load(FinetuneConfig, argv, parser)
    if args.config_file is None:
        layers = [Layer(f"{args.weights} (stored config)", stored_config(args.weights))]
        if args.data_root is not None:
            layers.append(Layer("--data-root", {"data": {"root": args.data_root}}))
        cfg = build_config(FinetuneConfig, layers + overrides_to_layers(FinetuneConfig, args.opts))
    validate_config(cfg)  # as run_test will: a printed config is one the test accepts
    if args.print_config:
        return print_config(_config_used(args.weights, cfg) if args.config_file is not None else cfg)
    output_dir = args.output_dir or str(Path(args.weights).expanduser().absolute().parent / "test")
    try:
        run_test(args.weights, cfg, output_dir, allow_missing=args.allow_missing,
                 allow_unexpected=args.allow_unexpected)
    finally:
        dist.destroy()  # as the training commands: no process group left to the interpreter's exit
    return 0


def _config_used(weights: str, given: FinetuneConfig) -> FinetuneConfig:
    """What :func:`run_test` evaluates ``weights`` with when ``given`` comes from --config-file."""
    try:
        stored = build_config(FinetuneConfig, [Layer(f"{weights} (stored config)", stored_config(weights))])
    except CheckpointFormatError:  # a released checkpoint: the given config describes it
        return given
    return validate_config(resolve_test_config(stored, given, weights))
