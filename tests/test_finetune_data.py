"""Fine-tuning data: data set folders, separate test sets, subsets, explicit corrupt-image skipping."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from passreid.config import load_config
from passreid.data import DamagedImagesError, DatasetLayoutError, build_dataset
from passreid.finetune import FinetuneConfig, load_finetune_data
from passreid.data.samplers import ShardSampler
from passreid.config import ConfigError
from passreid.data import check_data_root


def _cfg(tmp_path: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"train.output_dir={tmp_path / 'run'}", "data.num_workers=0",
                                              *overrides])


def test_the_data_root_is_a_folder_and_the_stage_never_renders_one(tmp_path: Path, synthetic_world: Path):
    cfg = _cfg(tmp_path, f"data.root={synthetic_world}/market_occluded")
    data = load_finetune_data(cfg)
    assert data.train.root == str(synthetic_world / "market_occluded")
    assert data.num_classes == 24 and data.num_cameras == 4 and data.test is data.train
    with pytest.raises(ConfigError, match="'data.root' is empty: pass --data-root DIR"):
        check_data_root("")
    # The generated: names of older demo recipes say what to pass instead; nothing is rendered.
    with pytest.raises(ConfigError, match=r"'generated:market'.*python -m passreid.demo --out DIR.*data.root=DIR/world/market"):
        load_finetune_data(_cfg(tmp_path, "data.root=generated:market"))
    assert not (tmp_path / "world").exists()


def test_market_layout_with_empty_folders_is_an_error_naming_the_folder(tmp_path: Path):
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "empty_market" / split).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=f"{tmp_path / 'empty_market' / 'bounding_box_train'}: no images"):
        load_finetune_data(_cfg(tmp_path, f"data.root={tmp_path / 'empty_market'}"))


def test_unlabelled_training_set_is_an_error_naming_its_folder(tmp_path: Path, synthetic_world: Path):
    pool = synthetic_world / "pool"
    with pytest.raises(ValueError, match=f"'image_folder' at {pool} has no labelled train split .*unlabelled"):
        load_finetune_data(_cfg(tmp_path, "data.dataset=image_folder", f"data.root={pool}"))


def test_separate_test_dataset_and_subsets(tmp_path: Path, synthetic_world: Path):
    cfg = _cfg(tmp_path, f"data.root={synthetic_world / 'market'}", "data.test_dataset=market_naming",
               f"data.test_root={synthetic_world / 'market_occluded'}", "data.max_train_ids=10",
               "data.max_test_ids=5")
    data = load_finetune_data(cfg)
    assert data.num_classes == 10 and {item.pid for item in data.train.train} == set(range(10))
    assert data.test.name == "market_naming" and data.test.root.endswith("market_occluded")
    query_ids = {item.pid for item in data.test.query}
    assert len(query_ids) == 5 and {item.pid for item in data.test.gallery} <= query_ids


def test_corrupt_images_stop_the_run_at_start_up_or_are_skipped_when_asked(tmp_path: Path, synthetic_world: Path):
    root = tmp_path / "market"
    shutil.copytree(synthetic_world / "market", root)
    victim = sorted((root / "query").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    truncated = sorted((root / "bounding_box_train").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:300])
    # Found when the data set is read, before any image is sampled, naming both files.
    with pytest.raises(DamagedImagesError) as info:
        load_finetune_data(_cfg(tmp_path, f"data.root={root}"))
    assert str(victim) in str(info.value) and str(truncated) in str(info.value)
    # Own handler: setup_logging() elsewhere in the session stops "passreid" records reaching the root logger.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    data_logger = logging.getLogger("passreid")
    data_logger.addHandler(handler)
    try:
        skipping = load_finetune_data(_cfg(tmp_path, f"data.root={root}", "data.skip_corrupt=true"))
    finally:
        data_logger.removeHandler(handler)
    intact = build_dataset("market1501", synthetic_world / "market")
    assert len(skipping.test.query) == len(intact.query) - 1 and len(skipping.train.train) == len(intact.train) - 1
    assert str(victim) not in [item.path for item in skipping.test.query]
    text = "\n".join(record.getMessage() for record in records)
    assert str(victim) in text and str(truncated) in text and "left out 2 damaged image file(s)" in text


def test_shard_sampler_covers_every_index_once_without_padding():
    shards = [list(ShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and [len(s) for s in shards] == [4, 4, 3]
