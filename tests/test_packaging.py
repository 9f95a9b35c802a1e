"""A non-editable install has the stage commands and the recipes (they ship as package data)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from passreid.config import ConfigError
from passreid.config.yaml_io import load_yaml_layers, packaged_recipes_dir, resolve_recipe_path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("passreid-pretrain", "passreid-finetune", "passreid-finetune-test", "passreid-usl", "passreid-uda")
MARKET_RECIPE = "configs/finetune/market1501/pass_vit_s_256.yaml"


def _tracked_recipes() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "configs"], cwd=REPO, capture_output=True, text=True, check=True)
    return sorted(line for line in listed.stdout.splitlines() if line.endswith(".yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True)
    return next(out.glob("passreid-*.whl"))


def test_the_wheel_carries_every_recipe_and_the_stage_commands(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    recipes = _tracked_recipes()
    assert len(recipes) > 20
    missing = [path for path in recipes if f"passreid/{path}" not in names]
    assert not missing, f"recipes not shipped in the wheel: {missing}"
    for command in COMMANDS:
        assert f"{command} = passreid." in entry_points, command


def test_an_installed_wheel_finds_its_recipes_from_any_directory(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder here: the recipe must come from the package
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-m", "passreid.finetune", "--config-file", MARKET_RECIPE, "--print-config"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "market1501" in run.stdout  # the recipe's data set, read through its _base_ chain
    where = subprocess.run([sys.executable, "-c", "import passreid; print(passreid.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))  # the installed copy ran, not this checkout


def test_a_recipe_path_resolves_to_the_file_when_it_exists_else_to_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = resolve_recipe_path(MARKET_RECIPE)
    assert shipped == packaged_recipes_dir() / "finetune/market1501/pass_vit_s_256.yaml" and shipped.is_file()
    own = tmp_path / "configs" / "finetune" / "mine.yaml"  # a user's own configs/ folder wins
    own.parent.mkdir(parents=True)
    own.write_text("model:\n  arch: vit_small\n")
    assert resolve_recipe_path("configs/finetune/mine.yaml") == Path("configs/finetune/mine.yaml")
    assert len(load_yaml_layers(MARKET_RECIPE)) >= 2  # the file and its _base_ chain


def test_a_missing_recipe_names_where_the_shipped_ones_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml; the recipes shipped with passreid "
                                          r"are under .*configs"):
        load_yaml_layers("configs/finetune/nope.yaml")
