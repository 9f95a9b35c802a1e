"""tools/cluster_features.py: labels file, printed summary, clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tool_loading import load_tool_module

from passreid.cluster import dbscan_pseudo_labels

TOOL = Path(__file__).resolve().parents[1] / "tools" / "cluster_features.py"


def load_tool():
    return load_tool_module(TOOL, "cluster_features_tool")


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def identity_features(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 32))
    x = np.repeat(centres, 8, axis=0) + 0.5 * rng.normal(size=(96, 32))
    noise = rng.normal(size=(6, 32))  # scattered points, expected outliers
    return np.concatenate([x, noise]).astype(np.float32)


def test_writes_labels_and_prints_summary(tool, tmp_path, capsys):
    feats = identity_features()
    np.savez(tmp_path / "f.npz", feats=feats)
    out = tmp_path / "sub" / "labels.npy"
    assert tool.main(["--features", str(tmp_path / "f.npz"), "--out", str(out), "--eps", "0.6"]) == 0
    labels = np.load(out)
    assert labels.dtype == np.int64 and labels.shape == (len(feats),)
    np.testing.assert_array_equal(labels, dbscan_pseudo_labels(feats, eps=0.6))
    clusters, outliers = len(set(labels) - {-1}), int((labels == -1).sum())
    assert clusters >= 2 and outliers >= 1
    printed = capsys.readouterr().out
    assert f"{clusters} clusters, {outliers} outliers" in printed
    # Written to exactly the name given (numpy alone would add .npy), which the printed line names.
    bare = tmp_path / "sub" / "labels_epoch3"
    assert tool.main(["--features", str(tmp_path / "f.npz"), "--out", str(bare), "--eps", "0.6"]) == 0
    np.testing.assert_array_equal(np.load(bare), labels)
    assert f"labels written to {bare}\n" in capsys.readouterr().out


def test_options_are_passed_on(tool, tmp_path):
    feats = identity_features(1)
    np.savez(tmp_path / "f.npz", feats=feats)
    out = tmp_path / "labels.npy"
    argv = ["--features", str(tmp_path / "f.npz"), "--out", str(out),
            "--k1", "10", "--k2", "3", "--eps", "0.5", "--min-samples", "3", "--device", "cpu"]
    assert tool.main(argv) == 0
    np.testing.assert_array_equal(np.load(out), dbscan_pseudo_labels(feats, eps=0.5, min_samples=3, k1=10, k2=3))


@pytest.mark.parametrize("content,message", [
    (dict(features=np.ones((4, 3), np.float32)), "missing key(s) ['feats']; expected ['feats'], found ['features']"),
    (dict(feats=np.zeros((0, 8), np.float32)), "'feats' is empty"),
    (dict(feats=np.ones(5, np.float32)), "must be a 2-D"),
    (dict(feats=np.ones((4, 3), np.int64)), "must hold floating-point values"),
])
def test_bad_archives(tool, tmp_path, capsys, content, message):
    np.savez(tmp_path / "f.npz", **content)
    assert tool.main(["--features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "l.npy")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "l.npy").exists()


def test_nan_features_name_the_row(tool, tmp_path, capsys):
    feats = identity_features()
    feats[17, 3] = np.nan
    np.savez(tmp_path / "f.npz", feats=feats)
    assert tool.main(["--features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "l.npy")]) == 2
    assert "NaN/Inf values in 1 row(s), first at row 17" in capsys.readouterr().err


def test_missing_or_unreadable_file(tool, tmp_path, capsys):
    assert tool.main(["--features", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "l.npy")]) == 2
    assert "feature file not found" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_text("not an archive")
    assert tool.main(["--features", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "l.npy")]) == 2
    assert "cannot read it as an .npz archive" in capsys.readouterr().err
    np.save(tmp_path / "plain.npy", np.ones((3, 2), np.float32))
    assert tool.main(["--features", str(tmp_path / "plain.npy"), "--out", str(tmp_path / "l.npy")]) == 2
    assert "expected an .npz archive" in capsys.readouterr().err


def test_bad_parameter_is_reported(tool, tmp_path, capsys):
    np.savez(tmp_path / "f.npz", feats=identity_features())
    assert tool.main(["--features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "l.npy"), "--eps", "-1"]) == 2
    assert "eps must be a positive number" in capsys.readouterr().err


def test_runs_as_a_script(tmp_path):
    np.savez(tmp_path / "f.npz", feats=identity_features(2))
    result = subprocess.run([sys.executable, str(TOOL), "--features", str(tmp_path / "f.npz"),
                             "--out", str(tmp_path / "l.npy")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clusters" in result.stdout and (tmp_path / "l.npy").exists()
