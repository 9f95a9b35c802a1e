"""tools/dataset_info.py, run as a script the way users run it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "dataset_info.py"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (10, 120, 200)).save(path)


@pytest.fixture
def fake_market(tmp_path) -> Path:
    """Two train ids over three cameras, one query id, gallery with a distractor and a junk image."""
    folder = tmp_path / "market1501"
    names = {"bounding_box_train": ["0003_c1s1_000001_01.jpg", "0003_c2s1_000002_01.jpg", "0011_c3s2_000003_02.jpg"],
             "query": ["0005_c1s1_000004_01.jpg"],
             "bounding_box_test": ["0005_c2s1_000005_01.jpg", "0000_c4s1_000006_01.jpg", "-1_c1s1_000007_01.jpg"]}
    for split, files in names.items():
        for name in files:
            write_image(folder / split / name)
    return tmp_path


def test_json_output_is_exactly_the_split_figures(fake_market):
    result = run_tool("--dataset", "market1501", "--root", str(fake_market), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"train": {"ids": 2, "images": 3, "cameras": 3},
                                         "query": {"ids": 1, "images": 1, "cameras": 1},
                                         "gallery": {"ids": 2, "images": 2, "cameras": 2}}


def test_table_output(fake_market):
    result = run_tool("--dataset", "market1501", "--root", str(fake_market / "market1501"))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.strip().startswith(("train", "query", "gallery"))}
    assert rows == {"train": ["|", "2", "|", "3", "|", "3"], "query": ["|", "1", "|", "1", "|", "1"],
                    "gallery": ["|", "2", "|", "2", "|", "2"]}
    assert "dropped 1 junk image(s)" in result.stdout


def test_missing_dataset_prints_layout_and_fails(tmp_path):
    result = run_tool("--dataset", "dukemtmcreid", "--root", str(tmp_path), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "expected layout" in result.stderr and "DukeMTMC-reID/" in result.stderr
    assert str(tmp_path) in result.stderr


def test_empty_split_folders_fail_naming_the_folder(tmp_path):
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "market1501" / split).mkdir(parents=True)
    result = run_tool("--dataset", "market1501", "--root", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert str(tmp_path / "market1501" / "bounding_box_train") in result.stderr
    assert "no images" in result.stderr and "<pid>_c<camera>" in result.stderr
    assert "Traceback" not in result.stderr


def test_damaged_image_fails_naming_it_unless_skipped(fake_market):
    query = fake_market / "market1501" / "query"
    write_image(query / "0011_c2s1_000008_01.jpg")
    victim = query / "0005_c1s1_000004_01.jpg"
    victim.write_bytes(victim.read_bytes()[:40])
    result = run_tool("--dataset", "market1501", "--root", str(fake_market), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "1 damaged image file(s)" in result.stderr and str(victim) in result.stderr
    assert "Traceback" not in result.stderr
    skipped = run_tool("--dataset", "market1501", "--root", str(fake_market), "--json", "--skip-corrupt")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["query"] == {"ids": 1, "images": 1, "cameras": 1}
    assert str(victim) in skipped.stderr


def test_msmt17_options_are_passed_through(tmp_path):
    folder = tmp_path / "MSMT17"
    lines = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
    for pid in (0, 1):
        for list_name, image_dir, index, cam in (("list_train.txt", "train", 0, 2), ("list_val.txt", "train", 1, 3),
                                                 ("list_query.txt", "test", 0, 4), ("list_gallery.txt", "test", 1, 5)):
            rel = f"{pid:04d}/{pid:04d}_{index:03d}_{cam:02d}_0303noon_{index:04d}_0.jpg"
            write_image(folder / image_dir / rel)
            lines[list_name].append(f"{rel} {pid}\n")
    for name, content in lines.items():
        (folder / name).write_text("".join(content))
    result = run_tool("--dataset", "msmt17", "--root", str(tmp_path), "--version", "v1", "--train-split", "train",
                      "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"] == {"ids": 2, "images": 2, "cameras": 1}
    default_split = run_tool("--dataset", "msmt17", "--root", str(tmp_path), "--version", "v1", "--json")
    assert json.loads(default_split.stdout)["train"] == {"ids": 2, "images": 4, "cameras": 2}
    wrong_version = run_tool("--dataset", "msmt17", "--root", str(tmp_path), "--version", "v2")
    assert wrong_version.returncode == 2 and "V1 release" in wrong_version.stderr
    no_version = run_tool("--dataset", "msmt17", "--root", str(tmp_path))
    assert no_version.returncode == 2 and "needs version=" in no_version.stderr


def test_unlabeled_folder_reports_only_train(tmp_path):
    for name in ("images/a.jpg", "images/b.jpg", "extra/c.png"):
        write_image(tmp_path / name)
    result = run_tool("--dataset", "image_folder", "--root", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"train": {"ids": 0, "images": 3, "cameras": 0}}


@pytest.mark.realdata
def test_real_market1501_json(market1501_root):
    result = run_tool("--dataset", "market1501", "--root", str(market1501_root.parent), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"train": {"ids": 751, "images": 12936, "cameras": 6},
                                         "query": {"ids": 750, "images": 3368, "cameras": 6},
                                         "gallery": {"ids": 751, "images": 15913, "cameras": 6}}
