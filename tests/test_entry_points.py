"""The stage entry points (pretrain/train.py, finetune/train.py, finetune/test.py, usl/train.py, uda/train.py) as a
user meets them: a mistake in the input is one message on stderr and exit status 2 without a traceback (unless
--debug / PASSREID_DEBUG=1), recorded in the run's log.txt; --print-config; options after the overrides; resume
from the previous checkpoint when the latest is damaged; a full disk while writing a checkpoint.

Most cases call the scripts' ``main`` in this process (the same code as ``python <script>``, whose last line is
``sys.exit(main())``); one test starts the five scripts as real processes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from _disk_full import fill_disk
from _tool_loading import load_tool_module
from passreid.engine import Checkpointer
from passreid.finetune.trainer import FinetuneTrainer
from passreid.models import build_vit, export_backbone

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {name: REPO / name / f"{script}.py" for name, script in
           (("pretrain", "train"), ("finetune", "train"), ("usl", "train"), ("uda", "train"))}
SCRIPTS["test"] = REPO / "finetune" / "test.py"
CONFIGS = {"pretrain": "configs/pretrain/demo.yaml", "finetune": "configs/finetune/demo.yaml",
           "test": "configs/finetune/demo.yaml", "usl": "configs/usl/demo.yaml", "uda": "configs/uda/demo.yaml"}
# The fine-tuning demo made fast: 64x32 input, every iteration logged, a checkpoint at every epoch end.
FAST = ["model.img_size=[64,32]", "data.test_batch_size=256", "eval.period=100", "train.log_period=1",
        "train.checkpoint_period=1"]


@pytest.fixture(scope="module")
def scripts() -> dict:
    return {name: load_tool_module(path, f"entry_point_{name}") for name, path in SCRIPTS.items()}


def _run(scripts: dict, name: str, argv: list, capsys) -> tuple[int, str, str]:
    """``<name> main(argv)`` in this process; returns the exit status, stdout and stderr."""
    code = scripts[name].main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2 and ``<script>: error: <message>`` holding ``fragments``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert ": error: " in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _finetune_args(out: Path, world: Path, *overrides: str) -> list:
    return ["--config-file", REPO / CONFIGS["finetune"], "--output-dir", out, f"data.root={world}/market", *FAST,
            *overrides]


# ----------------------------------------------------------------------------- the real scripts


@pytest.mark.slow  # six processes, each importing torch
def test_each_script_answers_a_mistake_with_one_message_and_exit_status_2(tmp_path):
    """Five real processes (started together): stderr holds the message, not a traceback."""
    cases = {
        "pretrain": (["train.epochs=-1", "--data-root", tmp_path], "train.epochs"),
        # an option after an override (argparse used to take "--output-dir" for an override)
        "finetune": (["optim.lrr=1", "--output-dir", tmp_path / "ft"], "unknown config key 'optim.lrr' (did you "
                                                                       "mean 'optim.lr'?)"),
        "test": (["--weights", tmp_path / "missing.pth"], f"{tmp_path / 'missing.pth'}"),
        "usl": (["optim.lr=abc"], "config key 'optim.lr' expects float, got str 'abc'"),
        "uda": (["--config-file", tmp_path / "missing.yaml"], f"config file not found: {tmp_path / 'missing.yaml'}"),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("PASSREID_DEBUG", None)

    def start(name: str, args: list, extra_env: dict | None = None) -> subprocess.Popen:
        argv = [sys.executable, str(SCRIPTS[name])]
        if name != "test" and "--config-file" not in args:
            argv += ["--config-file", str(REPO / CONFIGS[name])]
        if "--output-dir" not in args and name != "test":
            argv += ["--output-dir", str(tmp_path / name)]
        return subprocess.Popen(argv + [str(a) for a in args], env={**env, **(extra_env or {})}, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    processes = {name: start(name, args) for name, (args, _) in cases.items()}
    debug = start("finetune", cases["finetune"][0], {"PASSREID_DEBUG": "1"})
    for name, process in processes.items():
        _, err = process.communicate(timeout=300)
        script = f"{SCRIPTS[name].parent.name}/{SCRIPTS[name].name}"
        _assert_user_error(process.returncode, err, f"{script}: error: ", cases[name][1])
        if name != "pretrain":  # pre-training lists every invalid key, one per line
            assert err.count("\n") == 1, err
    _, err = debug.communicate(timeout=300)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("finetune/train.py: error: unknown config key 'optim.lrr'")


# ----------------------------------------------------------------------------- configuration mistakes


def _config_mistakes(tmp_path: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "not_yaml.yaml").write_text("model: [vit_small\n")
    (tmp_path / "plain_text.yaml").write_text("just some words\n")
    return {
        "unknown_key": (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        "wrong_type": (["optim.lr=abc"], "config key 'optim.lr' expects float, got str 'abc'"),
        "not_yaml": (["--config-file", tmp_path / "not_yaml.yaml"], f"invalid YAML in {tmp_path / 'not_yaml.yaml'}"),
        "not_a_mapping": (["--config-file", tmp_path / "plain_text.yaml"], "must be a mapping"),
        "missing_file": (["--config-file", tmp_path / "missing.yaml"], "config file not found"),
        "negative_epochs": (["train.epochs=-3"], "train.epochs"),
    }


@pytest.mark.parametrize("name", ["pretrain", "finetune", "test", "usl", "uda"])
@pytest.mark.parametrize("mistake", ["unknown_key", "wrong_type", "not_yaml", "not_a_mapping", "missing_file",
                                     "negative_epochs"])
def test_config_mistakes_are_one_message(scripts, name, mistake, tmp_path, capsys):
    if name == "test" and mistake == "negative_epochs":
        pytest.skip("finetune/test.py does not train")
    args, fragment = _config_mistakes(tmp_path)[mistake]
    argv = ["--output-dir", tmp_path / "out"]
    if "--config-file" not in args:
        argv += ["--config-file", REPO / CONFIGS[name]]
    if name == "test":
        argv += ["--weights", tmp_path / "weights.pth"]
    if name == "uda":
        argv += [f"model.init_from={tmp_path / 'source.pth'}"]
    if name == "pretrain":  # the demo recipe names no folder: the command line does
        argv += ["--data-root", tmp_path]
    code, _, err = _run(scripts, name, argv + args, capsys)
    _assert_user_error(code, err, fragment)


def test_debug_flag_adds_the_traceback(scripts, tmp_path, capsys):
    code, _, err = _run(scripts, "finetune", ["--debug", "optim.lrr=1", "--output-dir", tmp_path], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("finetune/train.py: error: unknown config key 'optim.lrr' (did you mean "
                                 "'optim.lr'?) (from command line)")


def test_uda_without_a_source_model_is_one_message(scripts, tmp_path, capsys):
    code, _, err = _run(scripts, "uda", ["--config-file", REPO / CONFIGS["uda"], "--output-dir", tmp_path], capsys)
    _assert_user_error(code, err, "model.init_from")


# ----------------------------------------------------------------------------- data mistakes


def _empty_market(root: Path) -> Path:
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True)
    return root


@pytest.mark.parametrize("name", ["finetune", "usl", "test"])
def test_missing_data_root_names_the_folder(scripts, name, tmp_path, capsys, request):
    missing = tmp_path / "Market-1501-misnamed"
    argv = ["--output-dir", tmp_path / "out", "--data-root", missing]
    if name == "test":  # a trained model and the config stored in it
        argv += ["--weights", request.getfixturevalue("stopped_run") / "model_final.pth"]
    else:
        argv += ["--config-file", REPO / CONFIGS[name], *FAST]
    code, _, err = _run(scripts, name, argv, capsys)
    _assert_user_error(code, err, "dataset folder not found", str(missing))
    if name != "test":  # the run folder says why the run stopped
        assert f"{SCRIPTS[name].parent.name}/train.py stopped: market1501: dataset folder not found" in \
            (tmp_path / "out" / "log.txt").read_text()


def test_pretrain_missing_or_empty_image_folder(scripts, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "missing", tmp_path / "empty"):
        code, _, err = _run(scripts, "pretrain", ["--config-file", REPO / CONFIGS["pretrain"], "--output-dir",
                                                  tmp_path / "out", "data.dataset=image_folder", f"data.root={root}"],
                            capsys)
        _assert_user_error(code, err, str(root))


@pytest.mark.parametrize("name", ["finetune", "usl"])
def test_empty_image_folders_are_one_message_naming_the_folder(scripts, name, tmp_path, capsys):
    root = _empty_market(tmp_path / "Market-1501")
    code, _, err = _run(scripts, name, ["--config-file", REPO / CONFIGS[name], "--output-dir", tmp_path / "out",
                                        "--data-root", root, *FAST], capsys)
    _assert_user_error(code, err, f"{root / 'bounding_box_train'}: no images in this split folder")


# ----------------------------------------------------------------------------- weight files


def _bad_weights(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pth"
    vit = build_vit("vit_tiny", img_size=(64, 32))
    if kind == "missing_keys":
        torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, path)
    elif kind == "wrong_shapes":
        state = vit.state_dict()
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 10)
        torch.save(state, path)
    elif kind == "random_tensors":
        generator = torch.Generator().manual_seed(0)
        torch.save({f"layer{i}.weight": torch.randn(4, 4, generator=generator) for i in range(5)}, path)
    elif kind == "bare_tensor":
        torch.save(torch.randn(10, 10), path)
    elif kind == "text":
        path.write_text("these are not weights\n" * 20)
    elif kind == "truncated":
        torch.save(export_backbone(vit, "vit_tiny"), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


WEIGHT_KINDS = ["missing_keys", "wrong_shapes", "random_tensors", "bare_tensor", "text", "truncated"]


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_bad_pretrained_weights_are_one_message(scripts, kind, tmp_path, capsys, synthetic_world):
    weights = _bad_weights(kind, tmp_path)
    code, _, err = _run(scripts, "finetune", _finetune_args(tmp_path / "out", synthetic_world, "train.max_iters=1",
                                                            f"model.pretrained={weights}"), capsys)
    _assert_user_error(code, err)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_bad_weights_for_test_py_are_one_message(scripts, kind, tmp_path, capsys, synthetic_world):
    weights = _bad_weights(kind, tmp_path)
    code, _, err = _run(scripts, "test", ["--weights", weights, "--config-file", REPO / CONFIGS["test"],
                                          f"data.root={synthetic_world}/market", *FAST], capsys)
    _assert_user_error(code, err)


# ----------------------------------------------------------------------------- the output folder


def test_read_only_output_folder_is_one_message(scripts, tmp_path, capsys, monkeypatch, synthetic_world):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root writes anyway: let the check see the permission bits as a user would
            monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK) or
                                bool(os.stat(path).st_mode & 0o200))
        code, _, err = _run(scripts, "finetune", _finetune_args(out, synthetic_world), capsys)
    finally:
        out.chmod(0o755)
    _assert_user_error(code, err, f"output directory {out} is not writable")


def test_output_path_that_is_a_file_is_one_message(scripts, tmp_path, capsys, synthetic_world):
    (tmp_path / "taken").write_text("a file\n")
    code, _, err = _run(scripts, "finetune", _finetune_args(tmp_path / "taken", synthetic_world), capsys)
    _assert_user_error(code, err, f"output directory {tmp_path / 'taken'} exists and is not a directory")


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def stopped_run(scripts, tmp_path_factory, synthetic_world) -> Path:
    """A fine-tuning run stopped by train.max_iters=4 in its second epoch (3 iterations per epoch): checkpoints at
    iteration 3 (epoch end, now checkpoint.prev.pth) and 4 (checkpoint.pth)."""
    out = tmp_path_factory.mktemp("entry_points") / "run"
    assert scripts["finetune"].main([str(a) for a in _finetune_args(out, synthetic_world, "train.max_iters=4")]) == 0
    return out


def _copy(run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(run, folder / "run"))


def _train_records(out: Path) -> dict[int, dict]:
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            records[record["step"]] = record
    return records


def test_stopped_run_keeps_the_previous_checkpoint(stopped_run):
    assert Checkpointer(stopped_run).load()["iteration"] == 4
    assert torch.load(stopped_run / "checkpoint.prev.pth", weights_only=False)["iteration"] == 3


def test_resumed_run_counts_epochs_and_steps_as_the_stopped_one(scripts, stopped_run, tmp_path, synthetic_world):
    """Epochs from 1 in every log line, ``step`` = optimizer steps done in metrics.jsonl, on both sides of a resume."""
    out = _copy(stopped_run, tmp_path)
    log = (out / "log.txt").read_text()
    assert "stopped at iteration 4 (train.max_iters) in epoch 2; checkpoint saved" in log
    assert scripts["finetune"].main([str(a) for a in _finetune_args(out, synthetic_world, "train.max_iters=5")]) == 0
    log = (out / "log.txt").read_text()
    assert f"resumed from {out / 'checkpoint.pth'} at iteration 4, in epoch 2 (sampler position" in log
    records = _train_records(out)
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert [records[step]["epoch"] for step in sorted(records)] == [1, 1, 1, 2, 2]


def test_damaged_checkpoint_resumes_from_the_previous_one(scripts, stopped_run, tmp_path, synthetic_world):
    out = _copy(stopped_run, tmp_path)
    latest = out / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # a copy cut short
    assert scripts["finetune"].main([str(a) for a in _finetune_args(out, synthetic_world, "train.max_iters=5")]) == 0
    log = (out / "log.txt").read_text()
    assert f"checkpoint {latest} cannot be read" in log and f"resuming from the previous checkpoint {out}" in log
    assert f"resumed from {out / 'checkpoint.prev.pth'} at iteration 3, after epoch 1" in log
    assert Checkpointer(out).load()["iteration"] == 5
    assert sorted(_train_records(out)) == [1, 2, 3, 4, 5]


def test_no_readable_checkpoint_says_how_to_start_fresh(scripts, stopped_run, tmp_path, capsys, synthetic_world):
    out = _copy(stopped_run, tmp_path)
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        (out / name).write_bytes((out / name).read_bytes()[:1000])
    args = _finetune_args(out, synthetic_world, "train.max_iters=5")
    code, _, err = _run(scripts, "finetune", args, capsys)
    _assert_user_error(code, err, str(out / "checkpoint.pth"), str(out / "checkpoint.prev.pth"), "--no-resume")
    assert "finetune/train.py stopped: neither the latest nor the previous checkpoint" in (out / "log.txt").read_text()
    assert _run(scripts, "finetune", [*args, "train.max_iters=1", "--no-resume"], capsys)[0] == 0


def test_resuming_with_another_model_is_one_message(scripts, stopped_run, tmp_path, capsys, synthetic_world):
    out = _copy(stopped_run, tmp_path)
    code, _, err = _run(scripts, "finetune", _finetune_args(out, synthetic_world, "train.max_iters=5",
                                                            "model.arch=vit_small"), capsys)
    _assert_user_error(code, err, "the checkpoint's model state does not fit this run's model", "--no-resume")


def test_full_disk_while_writing_a_checkpoint(scripts, stopped_run, tmp_path, capsys, monkeypatch, synthetic_world):
    out = _copy(stopped_run, tmp_path)
    fill_disk(monkeypatch, free_bytes=4096)
    code, _, err = _run(scripts, "finetune", _finetune_args(out, synthetic_world, "train.max_iters=5"), capsys)
    latest = out / "checkpoint.pth"
    message = f"no space left on device while writing {latest}; the previous checkpoint {latest} is intact"
    assert code == 2 and err == f"finetune/train.py: error: {message}\n"
    assert f"finetune/train.py stopped: {message}" in (out / "log.txt").read_text()
    monkeypatch.undo()
    assert Checkpointer(out).load()["iteration"] == 4


def test_unexpected_error_keeps_its_traceback_and_is_recorded(scripts, tmp_path, monkeypatch, synthetic_world):
    def broken_step(self, batch):
        raise ZeroDivisionError("a bug in the loop")

    monkeypatch.setattr(FinetuneTrainer, "_step", broken_step)
    with pytest.raises(ZeroDivisionError):
        scripts["finetune"].main([str(a) for a in _finetune_args(tmp_path, synthetic_world)])
    log = (tmp_path / "log.txt").read_text()
    assert "finetune/train.py stopped by an unexpected error:\nTraceback (most recent call last)" in log
    assert "ZeroDivisionError: a bug in the loop" in log


# ----------------------------------------------------------------------------- --print-config


@pytest.mark.parametrize("name", ["pretrain", "finetune", "test", "usl", "uda"])
def test_print_config_prints_the_resolved_yaml_and_runs_nothing(scripts, name, tmp_path, capsys):
    out = tmp_path / "never_created"
    argv = ["--config-file", REPO / CONFIGS[name], "optim.lr=0.125", "--print-config", "--output-dir", out,
            *_REQUIRED_INPUTS.get(name, [])]
    if name == "test":  # a released checkpoint (no stored config): the config printed is the one given
        torch.save({"base.cls_token": torch.zeros(1, 1, 4)}, tmp_path / "released.pth")
        argv += ["--weights", tmp_path / "released.pth"]
    code, printed, err = _run(scripts, name, argv, capsys)
    assert code == 0, err
    config = yaml.safe_load(printed)
    assert config["optim"]["lr"] == 0.125  # the override, given before an option
    assert config["train"]["output_dir"] == str(out)
    assert not out.exists()


# What each training stage needs besides its recipe; paths need not exist yet (a launcher checks a pipeline's
# stages before the upstream stages have written them).
_REQUIRED_INPUTS = {"pretrain": ["--data-root", "/data/pool"], "uda": ["model.init_from=/runs/source/model_final.pth"]}


@pytest.mark.parametrize("name, override, message", [
    ("pretrain", "crops.local_crops_number=6", "config key 'crops.local_crops_number': must be 9 in PASS mode"),
    ("finetune", "data.batch_size=30", "config key 'data.batch_size': 30 must be a multiple of data.num_instances"),
    ("usl", "cluster.eps=0", "config key 'cluster.eps': must be positive"),
    ("uda", "memory.momentum=1.5", "config key 'memory.momentum': must be in [0, 1)"),
    ("finetune", "train.log_period=0", "config key 'train.log_period': must be >= 1, got 0"),
    ("usl", "train.dist_timeout_min=0", "config key 'train.dist_timeout_min': must be positive, got 0"),
    ("pretrain", None, "config key 'data.root': is empty"),
    ("uda", None, "config key 'model.init_from': UDA starts from a model trained on the source domain"),
])
def test_print_config_refuses_what_the_stage_would_refuse(scripts, name, override, message, tmp_path, capsys):
    # The launchers check a pipeline's stages with --print-config before queueing any job: a value the stage
    # cannot run with must stop them there, not when the job starts.
    required = _REQUIRED_INPUTS.get(name, []) if override is not None else []
    argv = ["--config-file", REPO / CONFIGS[name], "--print-config", "--output-dir", tmp_path / "out", *required,
            *([override] if override else [])]
    code, printed, err = _run(scripts, name, argv, capsys)
    assert code == 2 and message in err and printed == ""


def test_training_commands_leave_the_process_group_however_the_run_ends(monkeypatch, tmp_path):
    # A process group left to the interpreter's exit can abort a finished rank (gloo: "terminate called without
    # an active exception"), and the SLURM job then ends FAILED and cancels its afterok dependants.
    from passreid import cli, dist
    from passreid.finetune import FinetuneConfig
    from passreid.finetune.config import validate_config

    left = []
    monkeypatch.setattr(dist, "destroy", lambda: left.append(True))
    argv = ["--config-file", str(REPO / CONFIGS["finetune"]), "--output-dir", str(tmp_path)]

    def finished(cfg, resume):
        return types.SimpleNamespace(preempted=False)

    def failed(cfg, resume):
        raise RuntimeError("a bug in the run")

    assert cli.run_training_command(argv, "finetune", FinetuneConfig, finished, validate_config) == 0
    with pytest.raises(RuntimeError, match="a bug in the run"):
        cli.run_training_command(argv, "finetune", FinetuneConfig, failed, validate_config)
    assert left == [True, True]
