"""Comments and docs cite published code, never private notes.

A source comment, docstring, README or recipe comment that explains where a detail comes from names the
public repository and file (e.g. ``PASS-reID: PASS_transreid/model/make_model.py``), which a reader can
open. Notes that are not part of this repository cannot be opened by a reader, so citing them (``§3.2``,
``reference/...``, ``finetune-occluded.md``) is an error. This test scans every tracked text file of the
code, recipe and documentation folders and fails with the offending lines.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()

# Folders (trailing slash) and top-level files that ship code, recipes or user documentation.
GUARDED = ("src/", "finetune/", "pretrain/", "usl/", "uda/", "configs/", "tools/", "bench/", "launch/", "tests/",
           "README.md", "Makefile", "hubconf.py")

# A section sign, a path into a notes folder, or one of the notes' file names.
FORBIDDEN = re.compile(
    r"§|\breference/|\b(?:finetune-occluded|pretrain-pass|cluster-contrast|engineering-anchors)\.md\b")


def _tracked_files() -> list[str]:
    """Repository-relative paths of the tracked files under :data:`GUARDED` (the guard itself excluded)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout (git ls-files lists the tracked files)")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    paths = [p for p in listing.decode("utf-8").split("\0") if p]
    return [p for p in paths if p != THIS_FILE and any(p == g or (g.endswith("/") and p.startswith(g))
                                                        for g in GUARDED)]


def _text(path: Path) -> str | None:
    """The file's UTF-8 text, or None for a binary file (a NUL byte or bytes that are not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_guarded_folders_are_tracked() -> None:
    # The scan below is only meaningful if it sees files: every guarded folder holds tracked files.
    files = _tracked_files()
    for guarded in GUARDED:
        assert any(f == guarded or f.startswith(guarded) for f in files), f"nothing tracked under {guarded}"


def test_no_citation_of_private_notes() -> None:
    offending = []
    for rel in _tracked_files():
        path = REPO_ROOT / rel
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FORBIDDEN.search(line):
                offending.append(f"{rel}:{number}: {line.strip()}")
    assert not offending, (
        "cite the published code (repository: path, function) instead of private notes, or state the reason "
        "in the project's own words:\n" + "\n".join(offending))


@pytest.mark.parametrize("line, cited", [
    ("# see reference §3.2", True),
    ('"""PASS head (finetune-occluded.md, neck section)."""', True),
    ("# docs/reference/pretrain-pass.md", True),
    ("# (PASS-reID: PASS_transreid/model/make_model.py, build_transformer_pass)", False),
    ("# (cluster-contrast-reid: clustercontrast/models/cm.py)", False),
    ("# compared with the reference evaluator", False),
])
def test_pattern_tells_note_citations_from_code_citations(line: str, cited: bool) -> None:
    assert bool(FORBIDDEN.search(line)) is cited
