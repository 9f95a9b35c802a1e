"""Dataset readers, image decoding and the LUPerson LMDB reader, on small fake trees."""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from passreid.data import (
    CorruptImageError,
    DamagedImagesError,
    DatasetFormatError,
    DatasetLayoutError,
    ImageItem,
    ReIDDataset,
    SafeImageReader,
    build_dataset,
    check_image_files,
    list_datasets,
    read_image,
)
from passreid.data.images import MAX_LISTED_FILES
from passreid.data.lmdb_folder import make_lmdb_uri, parse_lmdb_uri


# ------------------------------------------------------------------------------------------------
# Fake trees
# ------------------------------------------------------------------------------------------------

def write_image(path: Path, color=(200, 30, 60), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), color).save(path, format=fmt)
    return path


def market_name(pid: int, cam: int, frame: int) -> str:
    pid_text = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}_c{cam}s1_{frame:06d}_01.jpg"


# (pid, camera) per split; frames make names unique. Train pids are written out of sorted order.
MARKET_SPEC = {
    "bounding_box_train": [(15, 1), (2, 1), (2, 3), (7, 2), (7, 2), (15, 6), (-1, 4)],
    "query": [(3, 1), (9, 5)],
    "bounding_box_test": [(3, 2), (9, 1), (0, 4), (0, 6), (-1, 1), (-1, 3), (3, 5)],
}


def make_market_tree(folder: Path, spec=MARKET_SPEC) -> Path:
    for split, entries in spec.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for frame, (pid, cam) in enumerate(entries):
            write_image(folder / split / market_name(pid, cam, frame))
    return folder


def duke_name(pid: int, cam: int, frame: int) -> str:
    return f"{pid:04d}_c{cam}_f{frame:07d}.jpg"


def make_duke_tree(folder: Path) -> Path:
    spec = {"bounding_box_train": [(1, 2), (1, 8), (5, 7)],
            "query": [(10, 3)],
            "bounding_box_test": [(10, 8), (12, 1), (13, 2)]}
    for split, entries in spec.items():
        for frame, (pid, cam) in enumerate(entries):
            write_image(folder / split / duke_name(pid, cam, frame))
    return folder


def make_occluded_reid_tree(folder: Path, ids=(1, 2, 3), per_id=2) -> Path:
    for sub in ("occluded_body_images", "whole_body_images"):
        for pid in ids:
            for index in range(1, per_id + 1):
                write_image(folder / sub / f"{pid:03d}" / f"{pid:03d}_{index:02d}.tif", fmt="TIFF")
    return folder


def msmt_name(pid: int, index: int, cam: int) -> str:
    return f"{pid:04d}/{pid:04d}_{index:03d}_{cam:02d}_0303morning_{index:04d}_0.jpg"


def make_msmt17_tree(folder: Path, version: str, train_pids=(0, 1, 2)) -> Path:
    train_dir, test_dir = ("train", "test") if version == "v1" else ("mask_train_v2", "mask_test_v2")
    lists = {
        "list_train.txt": (train_dir, [(pid, i, cam) for pid in train_pids for i, cam in ((0, 1), (1, 15))]),
        "list_val.txt": (train_dir, [(pid, 2, 7) for pid in train_pids]),
        "list_query.txt": (test_dir, [(0, 0, 3), (1, 0, 4)]),
        "list_gallery.txt": (test_dir, [(0, 1, 5), (1, 1, 6), (2, 0, 12)]),
    }
    for list_name, (image_dir, entries) in lists.items():
        lines = []
        for pid, index, cam in entries:
            rel = msmt_name(pid, index, cam)
            write_image(folder / image_dir / rel)
            lines.append(f"{rel} {pid}\n")
        (folder / list_name).write_text("".join(lines))
    return folder


# ------------------------------------------------------------------------------------------------
# Registry and the dataset type
# ------------------------------------------------------------------------------------------------

def test_registry_lists_all_readers():
    assert list_datasets() == sorted(["market1501", "dukemtmcreid", "occluded_duke", "occluded_duke_tsd",
                                      "occluded_reid", "msmt17", "market_naming", "image_folder", "luperson_lmdb"])


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as info:
        build_dataset("market", tmp_path)
    message = str(info.value)
    assert "'market'" in message
    for name in list_datasets():
        assert name in message


def test_unknown_option_names_accepted_options(tmp_path):
    make_market_tree(tmp_path / "market1501")
    with pytest.raises(ValueError, match=r"does not accept option\(s\) version"):
        build_dataset("market1501", tmp_path, version="v1")
    with pytest.raises(ValueError, match="accepted options: version, train_split"):
        build_dataset("msmt17", tmp_path, split="train")


def test_split_stats_and_table_count_distinct_ids_and_cameras():
    dataset = ReIDDataset("toy", "/x", train=[ImageItem("a", 0, 0), ImageItem("b", 0, 1), ImageItem("c", 1, 1)],
                          query=[ImageItem("q", 5, 2)], gallery=[ImageItem("g", 5, 0), ImageItem("h", 0, 0)])
    assert dataset.split_stats() == {"train": {"ids": 2, "images": 3, "cameras": 2},
                                     "query": {"ids": 1, "images": 1, "cameras": 1},
                                     "gallery": {"ids": 2, "images": 2, "cameras": 1}}
    assert (dataset.num_train_pids, dataset.num_train_cams) == (2, 2)
    table = dataset.split_table().splitlines()
    assert table[1].split() == ["split", "|", "ids", "|", "images", "|", "cameras"]
    assert table[3].split() == ["train", "|", "2", "|", "3", "|", "2"]
    assert table[5].split() == ["gallery", "|", "2", "|", "2", "|", "1"]


# ------------------------------------------------------------------------------------------------
# Market-1501 naming
# ------------------------------------------------------------------------------------------------

def test_market1501_parsing_relabelling_junk_and_distractors(tmp_path, caplog):
    folder = make_market_tree(tmp_path / "Market-1501-v15.09.15")
    with caplog.at_level(logging.INFO, logger="passreid.data.datasets"):
        dataset = build_dataset("market1501", tmp_path)
    assert dataset.root == str(folder)
    assert dataset.split_stats() == {"train": {"ids": 3, "images": 6, "cameras": 4},
                                     "query": {"ids": 2, "images": 2, "cameras": 2},
                                     "gallery": {"ids": 3, "images": 5, "cameras": 5}}
    # Sorted iteration: names sort by pid text, then camera.
    assert [Path(i.path).name for i in dataset.train] == sorted(Path(i.path).name for i in dataset.train)
    # Relabelling follows sorted raw pids: 2 -> 0, 7 -> 1, 15 -> 2; camids are 0-based.
    raw_pid = {Path(i.path).name: int(Path(i.path).name.split("_")[0]) for i in dataset.train}
    assert {(raw_pid[Path(i.path).name], i.pid) for i in dataset.train} == {(2, 0), (7, 1), (15, 2)}
    assert sorted((i.pid, i.camid) for i in dataset.train) == [(0, 0), (0, 2), (1, 1), (1, 1), (2, 0), (2, 5)]
    # Test splits keep raw pids; pid 0 distractors stay in the gallery; junk (-1) is gone everywhere.
    assert sorted(i.pid for i in dataset.gallery) == [0, 0, 3, 3, 9]
    assert sorted((i.pid, i.camid) for i in dataset.query) == [(3, 0), (9, 4)]
    assert all(i.pid != -1 for split in (dataset.train, dataset.query, dataset.gallery) for i in split)
    assert all(Path(i.path).is_absolute() and Path(i.path).is_file() for i in dataset.gallery)
    assert "dropped 2 junk image(s)" in dataset.split_table()
    assert "differ from the published release" in dataset.split_table()
    assert "train   |   3 |      6 |       4" in caplog.text  # the table is logged


@pytest.mark.parametrize("folder_name", ["market1501", "Market-1501", "Market1501", "."])
def test_market1501_accepts_folder_or_parent(tmp_path, folder_name):
    folder = make_market_tree(tmp_path / folder_name)
    dataset = build_dataset("market1501", folder if folder_name == "." else tmp_path)
    assert dataset.root == str(folder.resolve()) and len(dataset.train) == 6


def test_market1501_missing_folder_shows_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("market1501", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert str(tmp_path / "Market-1501-v15.09.15") in message and "does not exist" in message
    for entry in ("bounding_box_train/", "query/", "bounding_box_test/", "0002_c1s1_000451_03.jpg"):
        assert entry in message
    assert isinstance(info.value, FileNotFoundError)


def test_market1501_misnamed_folder_gets_a_hint(tmp_path):
    make_market_tree(tmp_path / "my_market_copy")
    with pytest.raises(DatasetLayoutError, match=r"hint: .*my_market_copy has this layout"):
        build_dataset("market1501", tmp_path)


def test_market1501_incomplete_folder_names_missing_split(tmp_path):
    folder = make_market_tree(tmp_path / "market1501")
    for file in (folder / "query").iterdir():
        file.unlink()
    (folder / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"market1501  \(missing: query\)"):
        build_dataset("market1501", tmp_path)


@pytest.mark.parametrize("split", ["bounding_box_train", "query", "bounding_box_test"])
def test_market_empty_split_folder_is_an_error_naming_it(tmp_path, split):
    folder = make_market_tree(tmp_path / "market1501")
    for file in (folder / split).iterdir():
        file.unlink()
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("market1501", tmp_path)
    message = str(info.value)
    assert f"{folder / split}: no images in this split folder (it is empty)" in message
    assert "'<pid>_c<camera>...' (e.g. 0002_c1s1_000451_03.jpg)" in message and ".jpg" in message


def test_market_split_of_other_files_or_junk_only_is_an_error(tmp_path):
    folder = make_market_tree(tmp_path / "market1501")
    for file in (folder / "query").iterdir():
        file.unlink()
    (folder / "query" / "readme.txt").write_text("images go here")
    with pytest.raises(DatasetLayoutError, match=r"query: no images .*only 1 other entry \(readme\.txt\)"):
        build_dataset("market1501", tmp_path)
    write_image(folder / "query" / market_name(-1, 1, 0))
    with pytest.raises(DatasetLayoutError, match=r"query: all 1 images are junk \(pid -1\)"):
        build_dataset("market1501", tmp_path)


def test_market_file_with_wrong_name_is_an_error_naming_it(tmp_path):
    folder = make_market_tree(tmp_path / "market1501")
    write_image(folder / "query" / "person_001.jpg")
    with pytest.raises(DatasetFormatError, match=r"query/person_001\.jpg: file name does not follow"):
        build_dataset("market1501", tmp_path)


def test_market_camera_out_of_range_is_an_error(tmp_path):
    folder = make_market_tree(tmp_path / "market1501")
    write_image(folder / "query" / market_name(4, 7, 99))
    with pytest.raises(DatasetFormatError, match=r"0004_c7s1_000099_01\.jpg: camera c7 .* 1\.\.6"):
        build_dataset("market1501", tmp_path)


def test_market_non_image_files_are_reported_not_silently_skipped(tmp_path, caplog):
    folder = make_market_tree(tmp_path / "market1501")
    (folder / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset("market1501", tmp_path)
    assert "ignored 1 non-image entry (Thumbs.db)" in dataset.split_table()
    assert "Thumbs.db" in caplog.text
    assert len(dataset.gallery) == 5


def test_market_naming_reads_any_folder_name_but_only_the_folder_itself(tmp_path):
    folder = make_market_tree(tmp_path / "renamed_occluded_set")
    dataset = build_dataset("market_naming", folder)
    assert dataset.split_stats()["gallery"] == {"ids": 3, "images": 5, "cameras": 5}
    assert not any("published" in note for note in dataset.notes)
    with pytest.raises(DatasetLayoutError, match="root must be the dataset folder itself"):
        build_dataset("market_naming", tmp_path / "nowhere")


def test_dukemtmcreid_and_occluded_duke(tmp_path):
    make_duke_tree(tmp_path / "DukeMTMC-reID")
    make_duke_tree(tmp_path / "Occluded_Duke")
    for name in ("dukemtmcreid", "occluded_duke"):
        dataset = build_dataset(name, tmp_path)
        assert dataset.split_stats() == {"train": {"ids": 2, "images": 3, "cameras": 3},
                                         "query": {"ids": 1, "images": 1, "cameras": 1},
                                         "gallery": {"ids": 3, "images": 3, "cameras": 3}}
        assert sorted((i.pid, i.camid) for i in dataset.train) == [(0, 1), (0, 7), (1, 6)]
    torchreid_style = make_duke_tree(tmp_path / "nested" / "dukemtmc-reid" / "DukeMTMC-reID")
    assert build_dataset("dukemtmcreid", tmp_path / "nested").root == str(torchreid_style)


def test_occluded_duke_layout_error_names_its_folder(tmp_path):
    make_duke_tree(tmp_path / "DukeMTMC-reID")
    with pytest.raises(DatasetLayoutError, match="Occluded_Duke"):
        build_dataset("occluded_duke", tmp_path / "missing_parent")


# ------------------------------------------------------------------------------------------------
# Occluded-REID
# ------------------------------------------------------------------------------------------------

def test_occluded_reid_query_occluded_gallery_whole_no_train(tmp_path):
    folder = make_occluded_reid_tree(tmp_path / "Occluded_REID")
    dataset = build_dataset("occluded_reid", tmp_path)
    assert dataset.train == []
    assert dataset.split_stats() == {"train": {"ids": 0, "images": 0, "cameras": 0},
                                     "query": {"ids": 3, "images": 6, "cameras": 1},
                                     "gallery": {"ids": 3, "images": 6, "cameras": 1}}
    # DPM's Rename.py cameras (query c1, gallery c3): what a Market-trained SIE model embeds them as.
    assert {i.camid for i in dataset.query} == {0} and {i.camid for i in dataset.gallery} == {2}
    assert all("occluded_body_images" in i.path and i.path.endswith(".tif") for i in dataset.query)
    assert all("whole_body_images" in i.path for i in dataset.gallery)
    assert [i.pid for i in dataset.query] == [1, 1, 2, 2, 3, 3]
    assert dataset.root == str(folder)
    assert "no train split" in dataset.split_table() and "market1501" in dataset.split_table()


def test_occluded_reid_pid_folder_mismatch_and_bad_name(tmp_path):
    folder = make_occluded_reid_tree(tmp_path / "Occluded_REID")
    write_image(folder / "whole_body_images" / "002" / "005_01.tif", fmt="TIFF")
    with pytest.raises(DatasetFormatError, match=r"005_01\.tif: pid 5 .* folder 002/"):
        build_dataset("occluded_reid", tmp_path)
    (folder / "whole_body_images" / "002" / "005_01.tif").unlink()
    write_image(folder / "occluded_body_images" / "001" / "img1.tif", fmt="TIFF")
    with pytest.raises(DatasetFormatError, match=r"img1\.tif: file name does not follow Occluded-REID"):
        build_dataset("occluded_reid", tmp_path)


def test_occluded_reid_empty_folder_is_an_error_naming_it(tmp_path):
    folder = make_occluded_reid_tree(tmp_path / "Occluded_REID")
    shutil.rmtree(folder / "whole_body_images")
    (folder / "whole_body_images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"whole_body_images: no images .*'<pid>/<pid>_<index>\.tif'"):
        build_dataset("occluded_reid", tmp_path)


def test_occluded_reid_missing_layout(tmp_path):
    (tmp_path / "Occluded_REID" / "whole_body_images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("occluded_reid", tmp_path)
    assert "missing: occluded_body_images" in str(info.value)
    assert "occluded_body_images/001/001_01.tif" in str(info.value)


# ------------------------------------------------------------------------------------------------
# MSMT17
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,folder_name", [("v1", "MSMT17"), ("v1", "MSMT17_V1"), ("v2", "MSMT17_V2")])
def test_msmt17_versions_and_train_splits(tmp_path, version, folder_name):
    folder = make_msmt17_tree(tmp_path / folder_name, version)
    trainval = build_dataset("msmt17", tmp_path, version=version)
    assert trainval.root == str(folder)
    assert trainval.split_stats() == {"train": {"ids": 3, "images": 9, "cameras": 3},
                                      "query": {"ids": 2, "images": 2, "cameras": 2},
                                      "gallery": {"ids": 3, "images": 3, "cameras": 3}}
    train_only = build_dataset("msmt17", tmp_path, version=version, train_split="train")
    assert train_only.split_stats()["train"] == {"ids": 3, "images": 6, "cameras": 2}
    # Camera from the third '_' field of the name, 0-based; list order kept; pids already 0..N-1.
    assert [(i.pid, i.camid) for i in train_only.train] == [(0, 0), (0, 14), (1, 0), (1, 14), (2, 0), (2, 14)]
    assert {i.camid for i in trainval.train} == {0, 6, 14}
    assert [(i.pid, i.camid) for i in trainval.gallery] == [(0, 4), (1, 5), (2, 11)]
    image_dir = "test" if version == "v1" else "mask_test_v2"
    assert all(f"/{image_dir}/" in i.path and Path(i.path).is_file() for i in trainval.query)


def test_msmt17_version_is_required(tmp_path):
    make_msmt17_tree(tmp_path / "MSMT17", "v1")
    with pytest.raises(ValueError, match="msmt17 needs version='v1'.*never guessed"):
        build_dataset("msmt17", tmp_path)
    with pytest.raises(ValueError, match="must be 'v1' or 'v2'"):
        build_dataset("msmt17", tmp_path, version="v3")
    with pytest.raises(ValueError, match="train_split must be one of"):
        build_dataset("msmt17", tmp_path, version="v1", train_split="all")


def test_msmt17_v1_request_on_v2_folder_is_an_error(tmp_path):
    make_msmt17_tree(tmp_path / "MSMT17_V2", "v2")
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("msmt17", tmp_path, version="v1")
    message = str(info.value)
    assert "version='v1' was requested" in message and "V2 release" in message and "version='v2'" in message
    assert str(tmp_path / "MSMT17_V2") in message


def test_msmt17_v2_request_on_v1_folder_is_an_error(tmp_path):
    make_msmt17_tree(tmp_path / "MSMT17", "v1")
    with pytest.raises(DatasetLayoutError, match=r"version='v2' was requested.*V1 release \(train/, test/\)"):
        build_dataset("msmt17", tmp_path / "MSMT17", version="v2")


def test_msmt17_both_releases_present_picks_the_requested_one(tmp_path):
    make_msmt17_tree(tmp_path / "MSMT17_V1", "v1")
    make_msmt17_tree(tmp_path / "MSMT17_V2", "v2")
    assert build_dataset("msmt17", tmp_path, version="v1").root == str(tmp_path / "MSMT17_V1")
    assert build_dataset("msmt17", tmp_path, version="v2").root == str(tmp_path / "MSMT17_V2")


def test_msmt17_missing_everything_shows_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("msmt17", tmp_path, version="v1")
    assert "list_train.txt" in str(info.value) and "train/0000/" in str(info.value)


def test_msmt17_list_problems(tmp_path):
    folder = make_msmt17_tree(tmp_path / "MSMT17", "v1", train_pids=(0, 1, 3))
    with pytest.raises(DatasetFormatError, match="not contiguous"):
        build_dataset("msmt17", tmp_path, version="v1")
    folder = make_msmt17_tree(tmp_path / "other" / "MSMT17", "v1")
    with (folder / "list_query.txt").open("a") as handle:
        handle.write("0000/0000_009_02_0303morning_0009_0.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match=r"1 listed image\(s\) not found .*0000_009_02"):
        build_dataset("msmt17", tmp_path / "other", version="v1")
    (folder / "list_query.txt").write_text("0000/0000_000_03_0303morning_0000_0.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"list_query\.txt:1: expected '<relative path> <pid>'"):
        build_dataset("msmt17", tmp_path / "other", version="v1")
    (folder / "list_val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="lacks list_val.txt"):
        build_dataset("msmt17", tmp_path / "other", version="v1", train_split="trainval")


# ------------------------------------------------------------------------------------------------
# Unlabeled image folders
# ------------------------------------------------------------------------------------------------

def test_image_folder_recursive_scan(tmp_path, caplog):
    root = tmp_path / "LUP"
    names = ["images/34_01_0341_00001865.jpg", "images/00_00_0000_00000001.png", "more/deep/a.JPG"]
    for name in names:
        write_image(root / name, fmt="PNG" if name.endswith(".png") else "JPEG")
    (root / "images" / "readme.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset("image_folder", root)
    assert [i.path for i in dataset.train] == sorted(str(root / n) for n in names)
    assert all(i.pid == -1 and i.camid == -1 for i in dataset.train)
    assert dataset.query == [] and dataset.gallery == [] and dataset.unlabeled
    assert dataset.split_stats() == {"train": {"ids": 0, "images": 3, "cameras": 0}}
    assert "readme.txt" in caplog.text


def test_image_folder_file_list(tmp_path):
    root = tmp_path / "pool"
    for name in ("b/2.jpg", "a/1.jpg", "c/3.jpg"):
        write_image(root / name)
    (root / "subset.txt").write_text("c/3.jpg\n\na/1.jpg\n")
    dataset = build_dataset("image_folder", root, file_list="subset.txt")
    assert [i.path for i in dataset.train] == [str(root / "c/3.jpg"), str(root / "a/1.jpg")]
    (root / "subset.txt").write_text("a/1.jpg\nz/9.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"1 file\(s\) listed .* do not exist: .*z/9\.jpg"):
        build_dataset("image_folder", root, file_list="subset.txt")


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not a directory"):
        build_dataset("image_folder", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images found"):
        build_dataset("image_folder", tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# LUPerson LMDB
# ------------------------------------------------------------------------------------------------

LUP_KEYS = ["00_00_0000_00000000", "00_00_0000_00000001", "00_01_0003_00000000", "01_00_0000_00000005"]


def _jpeg_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 16), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_luperson_release(release: Path, key_file_content=None, extra_entries=()) -> dict[str, bytes]:
    """Write an LMDB the way LUPerson's convert_lmdb.py does: ascii key -> encoded JPEG bytes,
    plus keys.pkl beside the lmdb/ folder."""
    values = {key: _jpeg_bytes((40 * i, 255 - 40 * i, 90)) for i, key in enumerate(LUP_KEYS)}
    release.mkdir(parents=True, exist_ok=True)
    lmdb = pytest.importorskip("lmdb")  # a dependency of passreid; imported here so the module loads without it
    env = lmdb.open(str(release / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode("ascii"), np.frombuffer(value, np.uint8))  # the published script stores an array
        for key, value in extra_entries:
            txn.put(key, value)
    env.close()
    if key_file_content is not None:
        with open(release / "keys.pkl", "wb") as handle:
            pickle.dump(key_file_content, handle)
    return values


@pytest.mark.parametrize("key_file_content", [{"keys": LUP_KEYS, "pids": [0, 0, 1, 2]}, LUP_KEYS],
                         ids=["dict", "list"])
def test_luperson_lmdb_round_trip(tmp_path, key_file_content):
    values = write_luperson_release(tmp_path / "lmdb_300_30", key_file_content)
    dataset = build_dataset("luperson_lmdb", tmp_path / "lmdb_300_30")
    assert dataset.unlabeled and dataset.split_stats() == {"train": {"ids": 0, "images": 4, "cameras": 0}}
    assert [parse_lmdb_uri(i.path)[1].decode() for i in dataset.train] == LUP_KEYS
    assert all(i.pid == -1 and i.camid == -1 for i in dataset.train)
    for item, key in zip(dataset.train, LUP_KEYS):
        expected = Image.open(io.BytesIO(values[key])).convert("RGB")
        decoded = read_image(item.path)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_luperson_lmdb_without_key_file_scans_keys(tmp_path):
    release = tmp_path / "release"
    write_luperson_release(release, None, extra_entries=[(b"__len__", b"4")])
    dataset = build_dataset("luperson_lmdb", release / "lmdb")  # root = the LMDB folder itself
    assert [parse_lmdb_uri(i.path)[1].decode() for i in dataset.train] == sorted(LUP_KEYS)
    assert any("ignored 1 metadata entry (__len__)" in n for n in dataset.notes)
    assert read_image(dataset.train[0].path).size == (8, 16)


def test_luperson_lmdb_key_file_mismatch_and_missing_key(tmp_path):
    write_luperson_release(tmp_path, {"keys": LUP_KEYS + ["99_99_9999_99999999"]})
    dataset = build_dataset("luperson_lmdb", tmp_path)
    assert any("lists 5 keys but" in n and "holds 4 entries" in n for n in dataset.notes)
    with pytest.raises(FileNotFoundError, match="99_99_9999_99999999"):
        read_image(dataset.train[-1].path)


def test_luperson_lmdb_missing_layout_and_unsafe_key_file(tmp_path):
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("luperson_lmdb", tmp_path)
    assert "lmdb/data.mdb" in str(info.value) and "keys.pkl" in str(info.value)
    write_luperson_release(tmp_path, None)
    with open(tmp_path / "keys.pkl", "wb") as handle:
        pickle.dump({"keys": LUP_KEYS, "hook": logging.Logger}, handle)
    with pytest.raises(DatasetFormatError, match="refusing to load logging.Logger"):
        build_dataset("luperson_lmdb", tmp_path)
    (tmp_path / "keys.pkl").write_bytes(pickle.dumps(LUP_KEYS)[:-5])  # cut short
    with pytest.raises(DatasetFormatError, match="keys.pkl: cannot read the key list"):
        build_dataset("luperson_lmdb", tmp_path)


def test_lmdb_uri_round_trip_with_unusual_keys(tmp_path):
    uri = make_lmdb_uri(tmp_path / "db#1", b"a#b/c d\xff")
    assert parse_lmdb_uri(uri) == (str(tmp_path / "db#1"), b"a#b/c d\xff")
    with pytest.raises(ValueError, match="lmdb://"):
        parse_lmdb_uri("lmdb:///no/key")


def _read_sizes(paths: list[str]) -> tuple[list[tuple[int, int]], bool]:
    from passreid.data import lmdb_folder

    sizes = [read_image(path).size for path in paths]
    # The handle cache must belong to this worker, not the one inherited from the parent.
    return sizes, lmdb_folder._env_cache_pid == os.getpid()


def test_lmdb_items_are_readable_in_forked_workers(tmp_path):
    write_luperson_release(tmp_path, {"keys": LUP_KEYS})
    paths = [i.path for i in build_dataset("luperson_lmdb", tmp_path).train]
    read_image(paths[0])  # the parent opens its handle first; children must not reuse it
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_read_sizes, [paths[:2], paths[2:]])
    assert results == [([(8, 16)] * 2, True), ([(8, 16)] * 2, True)]


# ------------------------------------------------------------------------------------------------
# Image decoding
# ------------------------------------------------------------------------------------------------

def test_read_image_returns_rgb_for_other_modes(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 6), 77).save(gray)
    image = read_image(gray)
    assert image.mode == "RGB" and image.size == (4, 6) and image.getpixel((0, 0)) == (77, 77, 77)


def test_truncated_jpeg_raises_corrupt_image_error_naming_the_file(tmp_path):
    path = tmp_path / "0002_c1s1_000451_03.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError) as info:
        read_image(path)
    assert str(path) in str(info.value) and "truncated" in str(info.value)
    assert info.value.path == str(path)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match="garbage.jpg"):
        read_image(garbage)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.jpg")


def test_corrupt_lmdb_value_names_the_address(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00_00_0000_00000000", _jpeg_bytes((1, 2, 3))[:60])
    env.close()
    uri = make_lmdb_uri(tmp_path / "db", "00_00_0000_00000000")
    with pytest.raises(CorruptImageError, match="00_00_0000_00000000"):
        read_image(uri)


def test_safe_image_reader_skips_and_counts_or_raises(tmp_path, caplog):
    good = write_image(tmp_path / "good.jpg")
    bad_a = tmp_path / "bad_a.jpg"
    bad_b = tmp_path / "bad_b.jpg"
    bad_a.write_bytes(b"\xff\xd8\xff broken")
    bad_b.write_bytes(good.read_bytes()[:40])
    strict = SafeImageReader(skip_corrupt=False)
    assert strict(good).size == (8, 16)
    with pytest.raises(CorruptImageError, match="bad_a.jpg"):
        strict(bad_a)
    assert strict.num_skipped == 0
    lenient = SafeImageReader(skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="passreid.data.images"):
        results = [lenient(p) for p in (bad_a, good, bad_b)]
    assert results[0] is None and results[2] is None and results[1].size == (8, 16)
    assert lenient.num_skipped == 2 and lenient.skipped_paths == [str(bad_a), str(bad_b)]
    assert "bad_a.jpg" in caplog.text and "bad_b.jpg" in caplog.text and "2 skipped so far" in caplog.text


# ------------------------------------------------------------------------------------------------
# Start-up check of every image file
# ------------------------------------------------------------------------------------------------

def _noise_image(path: Path, fmt: str | None = None) -> Path:
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _intact_and_damaged_files(folder: Path) -> list[Path]:
    """Intact files of every format the check knows, and copies cut at many places or padded."""
    folder.mkdir()
    intact = [_noise_image(folder / f"ok.{ext}") for ext in ("jpg", "png", "bmp", "webp", "tif", "ppm")]
    files = list(intact)
    for source in intact:
        data = source.read_bytes()
        for cut in (0, 1, 12, len(data) // 4, len(data) // 2, len(data) - 40, len(data) - 2, len(data) - 1):
            files.append(folder / f"cut{cut}_{source.name}")
            files[-1].write_bytes(data[:cut])
    padded = folder / "padded.jpg"  # bytes after the EOI marker (some encoders append data): still decodable
    padded.write_bytes(intact[0].read_bytes() + b"\0" * 100)
    garbage = folder / "text.jpg"
    garbage.write_text("not an image")
    return files + [padded, garbage]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, decoding the cut TIFFs
def test_image_check_rejects_exactly_the_files_read_image_rejects(tmp_path):
    files = _intact_and_damaged_files(tmp_path / "files")

    def decodes(path: Path) -> bool:
        try:
            read_image(path)
        except CorruptImageError:
            return False
        return True

    rejected = {path for path, _ in check_image_files(str(p) for p in files)}
    assert rejected == {str(p) for p in files if not decodes(p)}
    # The cuts of the JPEG and PNG (the formats with an end marker) are all rejected; padding is not.
    assert {str(tmp_path / "files" / f"cut{n}_ok.jpg") for n in (0, 1, 12)} <= rejected
    assert str(tmp_path / "files" / "padded.jpg") not in rejected and str(tmp_path / "files" / "text.jpg") in rejected


def test_image_check_reads_only_the_ends_of_intact_files_with_an_end_marker(tmp_path, monkeypatch):
    import passreid.data.images as images

    files = [str(_noise_image(tmp_path / f"ok.{ext}")) for ext in ("jpg", "png", "bmp", "webp")]
    monkeypatch.setattr(images, "read_image", lambda path: pytest.fail(f"{path} was decoded"))
    assert check_image_files(files) == []


def test_damaged_files_stop_indexing_naming_every_file(tmp_path):
    folder = make_market_tree(tmp_path / "market1501")
    def kept(split):  # not junk: the reader drops pid -1 files, which are never read, so never checked
        return [path for path in sorted((folder / split).iterdir()) if not path.name.startswith("-1")]

    victims = kept("bounding_box_test")[:2] + kept("query")[:1]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(DamagedImagesError) as info:
        build_dataset("market1501", tmp_path)
    message = str(info.value)
    assert message.startswith(f"3 damaged image file(s) in market1501 ({folder})")
    assert all(str(victim) in message for victim in victims) and "data.skip_corrupt=true" in message
    assert sorted(path for path, _ in info.value.damaged) == sorted(map(str, victims))
    assert isinstance(info.value, CorruptImageError)


def test_the_image_check_can_be_left_out_for_huge_folders(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "000.jpg").write_bytes(b"")
    assert [Path(item.path).name for item in build_dataset("image_folder", folder, check_images=False).train] == [
        "000.jpg"]  # indexed unchecked: it fails when read
    with pytest.raises(DamagedImagesError):
        build_dataset("image_folder", folder)


def test_the_check_gives_the_same_answer_on_any_number_of_threads(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    paths = [str(_noise_image(folder / f"{index:03d}.jpg")) for index in range(40)]
    for victim in paths[3::7]:
        Path(victim).write_bytes(Path(victim).read_bytes()[:60])
    expected = paths[3::7]
    for threads in (1, 4, 16):
        assert [path for path, _ in check_image_files(paths, threads=threads)] == expected


def test_many_damaged_files_are_listed_up_to_a_limit_with_the_count(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    for index in range(MAX_LISTED_FILES + 5):
        (folder / f"{index:03d}.jpg").write_bytes(b"")
    with pytest.raises(DamagedImagesError) as info:
        build_dataset("image_folder", folder)
    message = str(info.value)
    assert f"{MAX_LISTED_FILES + 5} damaged image file(s)" in message and "... and 5 more" in message
    assert len([line for line in message.splitlines() if line.startswith(f"  {folder}")]) == MAX_LISTED_FILES
    assert len(info.value.damaged) == MAX_LISTED_FILES + 5


def test_skip_corrupt_leaves_damaged_files_out_and_logs_each(tmp_path, caplog):
    folder = make_market_tree(tmp_path / "market1501")
    intact = build_dataset("market1501", tmp_path, skip_corrupt=True)
    victim = Path(intact.train[0].path)
    victim.write_bytes(victim.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="passreid.data.images"):
        dataset = build_dataset("market1501", tmp_path, skip_corrupt=True)
    assert str(victim) not in [item.path for item in dataset.train] and len(dataset.train) == 5
    assert f"skipping damaged image {victim}" in caplog.text and "left out 1 damaged image file(s)" in caplog.text
    assert any("left out 1 damaged image file(s)" in note for note in dataset.notes)
    assert intact.split_stats()["query"] == dataset.split_stats()["query"]


# ------------------------------------------------------------------------------------------------
# Real Market-1501
# ------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_market1501_official_split_sizes(market1501_root):
    for root in (market1501_root, market1501_root.parent):
        dataset = build_dataset("market1501", root)
        assert dataset.split_stats() == {"train": {"ids": 751, "images": 12936, "cameras": 6},
                                         "query": {"ids": 750, "images": 3368, "cameras": 6},
                                         "gallery": {"ids": 751, "images": 15913, "cameras": 6}}
        assert {i.pid for i in dataset.train} == set(range(751))
        # Distractors (0000) are kept: 2,798 counted in the release (19,732 files - 3,819 junk = 15,913).
        assert sum(i.pid == 0 for i in dataset.gallery) == 2798
        assert "split sizes match the published release" in dataset.notes
    assert read_image(dataset.query[0].path).size == (64, 128)


@pytest.mark.realdata
def test_real_market1501_passes_the_image_check_without_decoding(market1501_root, monkeypatch):
    """Every real file passes on its first / last bytes alone: the check costs a few reads per file (about
    0.6 s for the 32,217 files when cached on a quiet 2-core machine; timing is not asserted)."""
    import passreid.data.images as images

    monkeypatch.setattr(images, "read_image", lambda path: pytest.fail(f"{path} was decoded"))
    dataset = build_dataset("market1501", market1501_root)
    assert len(dataset.train) + len(dataset.query) + len(dataset.gallery) == 32217
