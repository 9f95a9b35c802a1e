"""Feature extraction reports its progress (rate, ETA) when it runs long, and stays quiet when it does not."""
from __future__ import annotations

import logging
import re

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from passreid.engine import ThroughputLogger
from passreid.eval.features import extract_features


class _Records(logging.Handler):
    """Collects the messages of one logger (setup_logging elsewhere stops 'passreid' reaching the root)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.target = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Records:
        self.previous_level = self.target.level
        self.target.setLevel(logging.INFO)
        self.target.addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self.target.removeHandler(self)
        self.target.setLevel(self.previous_level)


def test_throughput_lines_are_spaced_in_time_with_rate_and_eta():
    clock = iter(float(t) for t in range(0, 1000, 10))  # a batch of 4 images every 10 s
    logger = logging.getLogger("passreid.test_throughput")
    progress = ThroughputLogger("gallery features", total=10, logger=logger, interval_s=30.0,
                                time_fn=lambda: next(clock))
    lines = [progress.update(4) for _ in range(10)]
    logged = [line for line in lines if line is not None]
    # Lines at 30, 60 and 90 s only (not one per batch); 0.4 images/s; ETA from the mean time per batch.
    assert logged == ["gallery features: batch 3/10 (12 images)  0.4 images/s  eta 0:01:10",
                      "gallery features: batch 6/10 (24 images)  0.4 images/s  eta 0:00:40",
                      "gallery features: batch 9/10 (36 images)  0.4 images/s  eta 0:00:10"]
    assert progress.finish() == "gallery features: 40 images in 0:01:50 (0.4 images/s)"


def test_a_pass_shorter_than_the_interval_is_silent():
    clock = iter([0.0, 1.0, 2.0, 3.0])
    progress = ThroughputLogger("query features", total=2, logger=logging.getLogger("passreid.test_throughput"),
                                interval_s=30.0, time_fn=lambda: next(clock))
    assert progress.update(8) is None and progress.update(8) is None and progress.finish() is None


class _Images(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict:
        return {"img": torch.full((3, 4, 4), float(index)), "pid": index, "camid": 0, "index": index}


def test_extraction_logs_progress_and_totals():
    loader = DataLoader(_Images(), batch_size=4)
    with _Records("passreid.eval.features") as records:
        features = extract_features(nn.Flatten(), loader, feature_fn=lambda m, x: m(x), device="cpu",
                                    label="query features", log_interval_s=0.0)
    assert features.feats.shape == (10, 48)
    assert len(records.messages) == 4  # every batch (interval 0) and the totals
    assert re.fullmatch(r"query features: batch 1/3 \(4 images\)  [\d.]+ images/s  eta \d+:\d\d:\d\d",
                        records.messages[0])
    assert re.fullmatch(r"query features: 10 images in \d+:\d\d:\d\d \([\d.]+ images/s\)", records.messages[-1])
    with _Records("passreid.eval.features") as quiet:
        extract_features(nn.Flatten(), loader, feature_fn=lambda m, x: m(x), device="cpu")  # 30 s default
    assert quiet.messages == []


def test_the_extractor_of_the_tools_prints_its_progress(tmp_path, capsys):
    from PIL import Image

    from _inference_models import save_backbone_export, tiny_pass_vit
    from passreid.inference import FeatureExtractor, show_progress

    images = tmp_path / "images"
    images.mkdir()
    for index in range(5):
        Image.new("RGB", (64, 128), (index, 0, 0)).save(images / f"{index}.png")
    weights = save_backbone_export(tmp_path / "backbone.pth", tiny_pass_vit())
    show_progress()
    show_progress()  # once per process: no second handler, so no line twice
    capsys.readouterr()
    FeatureExtractor(weights, "cpu", batch_size=2, log_interval_s=0.0)(images)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines  # batches 1-3 (interval 0) and the totals
    assert re.fullmatch(r"features: batch 1/3 \(2 images\)  [\d.]+ images/s  eta \d+:\d\d:\d\d", lines[0])
    assert re.fullmatch(r"features: 5 images in \d+:\d\d:\d\d \([\d.]+ images/s\)", lines[-1])
