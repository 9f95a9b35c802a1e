"""passreid.eval.feature_file: the feature file the tools pass to each other is written atomically to exactly
the path given, read back equal, and every malformed file is named with what was expected."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from _disk_full import fill_disk
from passreid.eval.feature_file import FeatureFileError, read_feature_file, write_feature_file


def _arrays(rows: int = 5, dim: int = 4):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((rows, dim)).astype(np.float32), np.arange(rows) % 2, np.arange(rows) % 3,
            [f"/images/{index:04d}_c1s1_000000_00.jpg" for index in range(rows)])


def test_round_trip_to_exactly_the_path_given(tmp_path):
    feats, pids, camids, paths = _arrays()
    target = tmp_path / "gallery_features"  # no .npz suffix: numpy alone would write gallery_features.npz
    assert write_feature_file(target, feats, pids=pids, camids=camids, paths=paths, model="a model") == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery_features"]  # no temp file left either
    stored = read_feature_file(target, require=("pids", "camids", "paths"))
    np.testing.assert_array_equal(stored.feats, feats)
    np.testing.assert_array_equal(stored.pids, pids)
    np.testing.assert_array_equal(stored.camids, camids)
    assert stored.paths == paths and stored.model == "a model"
    assert stored.pids.dtype == np.int64 and stored.feats.dtype == np.float32
    bare = read_feature_file(write_feature_file(tmp_path / "bare.npz", feats))
    assert bare.pids is None and bare.camids is None and bare.paths is None and bare.model is None


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    feats, *_ = _arrays()
    target = write_feature_file(tmp_path / "f.npz", feats)
    fill_disk(monkeypatch, free_bytes=64)
    with pytest.raises(OSError) as error:
        write_feature_file(target, np.zeros((1000, 64), np.float32))
    assert error.value.errno == errno.ENOSPC and "the previous feature file" in error.value.strerror
    monkeypatch.undo()
    np.testing.assert_array_equal(read_feature_file(target).feats, feats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]


def test_rows_that_do_not_match_are_refused_before_writing(tmp_path):
    feats, pids, _, paths = _arrays()
    with pytest.raises(ValueError, match="4 pids for 5 feature rows"):
        write_feature_file(tmp_path / "f.npz", feats, pids=pids[:4])
    with pytest.raises(ValueError, match="3 paths for 5 feature rows"):
        write_feature_file(tmp_path / "f.npz", feats, paths=paths[:3])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arrays, require, message", [
    (dict(feats=np.ones((3, 2), np.float32)), ("pids",), r"missing key\(s\) \['pids'\]; expected \['feats', 'pids'\]"),
    (dict(feats=np.ones((3, 2), np.float32), paths=np.array(["a", "b"])), (),
     "'paths' has 2 entries but 'feats' has 3 rows"),
    (dict(feats=np.ones((3, 2), np.float32), camids=np.ones(3, np.float32)), (), "'camids' must be a 1-D integer"),
    (dict(feats=np.ones((3, 2), np.float16) * np.inf), (), "NaN/Inf values in 3 row"),
])
def test_malformed_files_are_named_with_what_was_expected(tmp_path, arrays, require, message):
    path = tmp_path / "f.npz"
    np.savez(path, **arrays)
    with pytest.raises(FeatureFileError, match=message) as error:
        read_feature_file(path, require=require)
    assert str(path) in str(error.value)


def test_files_that_are_no_feature_archive(tmp_path):
    (tmp_path / "page.npz").write_text("<html>not found</html>")
    with pytest.raises(FeatureFileError, match=r"not a zip file: it starts with b'<html>'"):
        read_feature_file(tmp_path / "page.npz")
    np.save(tmp_path / "plain.npy", np.ones((2, 2), np.float32))
    with pytest.raises(FeatureFileError, match=r"got a plain array file \(.npy\)"):
        read_feature_file(tmp_path / "plain.npy")
    with pytest.raises(FeatureFileError, match="feature file not found"):
        read_feature_file(tmp_path / "none.npz")
    np.savez(tmp_path / "pickled.npz", feats=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FeatureFileError, match="cannot read its arrays"):
        read_feature_file(tmp_path / "pickled.npz")
