"""launch/: sbatch scripts, job arrays, the chained pipeline, pre-emption with requeue, and submitit.

The cluster tests run against a real single-node SLURM started on loopback for this module
(tests/slurm_cluster.py); they need root and Debian's slurm/munge packages (.ci/system_deps.sh installs
them) and are skipped otherwise. Every job trains a tiny model for a few iterations on the generated
world with one thread, so the module takes a few minutes of wall time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slurm_cluster import missing_requirements, start_cluster

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
JOB_TIMEOUT_S = 240
EVAL_KEYS = {"mAP", "rank1", "rank5", "rank10", "mINP"}
# Tiny budgets (see tests/test_finetune_train.py FAST, tests/test_pretrain_stage.py TINY).
FINETUNE_FAST = ["model.img_size=[64,32]", "train.log_period=1", "data.test_batch_size=256", "eval.period=100"]
PRETRAIN_TINY = ["model.img_size=[64,32]", "model.out_dim=256", "model.hidden_dim=128", "model.bottleneck_dim=64",
                 "crops.global_size=[64,32]", "crops.local_size=[32,16]", "monitor.period=0", "train.log_period=1",
                 "train.precision=fp32", "train.device=cpu", "data.num_workers=0", "train.epochs=1",
                 "optim.warmup_epochs=0", "data.dataset=image_folder", "data.batch_size_per_gpu=16"]
USL_TINY = ["model.img_size=[64,32]", "train.epochs=1", "train.iters=3"]
# What each job asks for on the 2-CPU test node (the scripts' defaults are for 8-GPU nodes).
SMALL_JOB = ["--partition=debug", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
             "--mem=1G", "--time=30"]

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node cluster for this module (stopped at the end, daemons by pid)."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory) -> Path:
    """A cluster profile for the test node: what a user writes for their cluster."""
    path = tmp_path_factory.mktemp("profile") / "test-node.yaml"
    path.write_text(yaml.safe_dump({
        "cluster": "slurm",
        "slurm": {"partition": "debug", "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1,
                  "mem_gb": 1, "time_min": 30, "signal_delay_s": 60},
        "env": {"OMP_NUM_THREADS": "1"},
    }))
    return path


@pytest.fixture(scope="module")
def submit_module():
    """launch/submit.py as a module (registered in sys.modules, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("launch_submit", LAUNCH / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def pool_list(synthetic_world, tmp_path_factory) -> Path:
    """32 images of the generated world's unlabeled pool (two pre-training iterations of 16)."""
    images = sorted(p.relative_to(synthetic_world / "pool").as_posix()
                    for p in (synthetic_world / "pool").rglob("*.jpg"))[:32]
    path = tmp_path_factory.mktemp("pool_list") / "pool32.txt"
    path.write_text("\n".join(images) + "\n")
    return path


def _sbatch(cluster, cwd: Path, *args: str) -> str:
    done = cluster.run("sbatch", "--parsable", *args, cwd=cwd, env=cluster.env(OMP_NUM_THREADS="1"))
    return done.stdout.strip().split(";")[0]


def _finished_ok(cluster, job_id: str) -> dict[str, str]:
    info = cluster.wait_until_finished(job_id, JOB_TIMEOUT_S)
    assert info["JobState"] == "COMPLETED", f"job {job_id} ended {info['JobState']}\n{cluster.describe_failure(info)}"
    return info


def _records(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=REPO)


# ---------------------------------------------------------------------------------------------- no cluster
def test_profiles_map_to_sbatch_options_and_submitit_parameters(submit_module, profile_file):
    default = submit_module.load_profile(LAUNCH / "profiles" / "default.yaml")
    assert submit_module.sbatch_options(default, "pretrain") == [
        "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=0G", "--time=4320",
        "--signal=USR1@300"]
    test_node = submit_module.load_profile(profile_file)
    assert submit_module.sbatch_options(test_node, "finetune") == [
        "--partition=debug", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
        "--mem=1G", "--time=30", "--signal=USR1@60", "--export=ALL,OMP_NUM_THREADS=1"]
    params = submit_module.executor_parameters(test_node, "finetune")
    assert params["slurm_partition"] == "debug" and params["timeout_min"] == 30 and params["gpus_per_node"] == 0
    assert params["slurm_signal_delay_s"] == 60 and params["slurm_setup"] == ["export OMP_NUM_THREADS=1"]
    local = submit_module.load_profile(LAUNCH / "profiles" / "local.yaml")
    assert local.cluster == "local" and "slurm_partition" not in submit_module.executor_parameters(local, "usl")
    # USL / UDA ask for the published run's 4 GPUs, which the recipes' BN chunks assume.
    assert submit_module.sbatch_options(default, "usl")[1:3] == ["--ntasks-per-node=4", "--gpus-per-node=4"]


def test_additional_sbatch_options_read_the_same_through_sbatch_and_submitit(submit_module, tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({"slurm": {"additional": {"exclusive": True, "mail_type": "END", "hint": False}}}))
    profile = submit_module.load_profile(path)
    options = submit_module.sbatch_options(profile, "finetune")
    assert "--exclusive" in options and "--mail-type=END" in options and not any("hint" in o for o in options)
    additional = submit_module.executor_parameters(profile, "finetune")["slurm_additional_parameters"]
    assert additional == {"requeue": True, "exclusive": True, "mail_type": "END"}  # submitit writes '-' and bare flags


@pytest.mark.parametrize("text, message", [
    ("cluster: pbs\n", "cluster must be"),
    ("slurm: {gpus_per_nodes: 4}\n", "unknown keys ['gpus_per_nodes']"),
    ("slurm: {nodes: two}\n", "slurm.nodes: expected"),
    ("slurm: {time_min: 0}\n", "time_min must be >= 1"),
    ("stages: {pretrian: {nodes: 2}}\n", "stages must map stage names"),
    ("stages: {finetune: {mem: 4}}\n", "stages.finetune: unknown keys ['mem']"),
])
def test_bad_profiles_are_rejected_with_the_reason(submit_module, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        submit_module.load_profile(path)


def test_list_files_pick_one_entry_per_array_task():
    script = f'source launch/common.sh; PASSREID_ROOT={REPO}; passreid_list_line configs/finetune/sweep_demo.txt "$I"'
    assert _bash(script, I="0").stdout.strip() == "configs/finetune/demo.yaml optim.lr=1.0e-3"
    assert _bash(script, I="1").stdout.strip() == "configs/finetune/demo.yaml optim.lr=5.0e-4"
    beyond = _bash(script, I="2")
    assert beyond.returncode == 2 and "has 2 entries; no entry for array task 2" in beyond.stderr


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "usl", "uda"])
def test_stage_scripts_run_outside_slurm(stage, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PASSREID_"))}
    done = subprocess.run(["bash", str(LAUNCH / f"{stage}.sh"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0 and f"launch/{stage}.sh [CONFIG.yaml | LIST.txt]" in done.stdout, done.stderr
    bad = subprocess.run(["bash", str(LAUNCH / f"{stage}.sh"), "missing.yaml"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60)
    assert bad.returncode == 2 and "config file 'missing.yaml' not found" in bad.stderr


PUBLISHED_DEFAULTS = {"pretrain": "configs/pretrain/pass_vit_s_lup.yaml",
                      "finetune": "configs/finetune/market1501/pass_vit_s_256.yaml",
                      "usl": "configs/usl/market_pass_vit_s.yaml",
                      "uda": "configs/uda/msmt2market_pass_vit_s.yaml"}


@pytest.mark.parametrize("stage", sorted(PUBLISHED_DEFAULTS))
def test_stage_scripts_without_a_config_run_the_published_recipe(stage, tmp_path):
    echo = tmp_path / "echo_python"  # stands in for the interpreter: prints the command the script would run
    echo.write_text('#!/bin/sh\necho "$@"\n')
    echo.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PASSREID_"))}
    done = subprocess.run(["bash", str(LAUNCH / f"{stage}.sh"), "--output-dir", "out"], capture_output=True,
                          text=True, cwd=tmp_path, env={**env, "PYTHON": str(echo)}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{stage}/train.py --config-file {REPO / PUBLISHED_DEFAULTS[stage]} --output-dir out" in done.stdout


def test_stage_script_arguments_and_environment_combine_in_order():
    # Environment < arguments < the array task's list line; --no-resume only before the first requeue.
    script = ("source launch/common.sh; passreid_stage=finetune; "
              "passreid_parse_args configs/finetune/sweep_demo.txt --output-dir out --no-resume b=2; "
              "passreid_apply_list; echo \"$passreid_config|$passreid_output_dir|$passreid_data_root|"
              "$passreid_no_resume|${passreid_overrides[*]}\"")
    done = _bash(script, OVERRIDES="a=1 b=1", DATA_ROOT="/data", SLURM_ARRAY_TASK_ID="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "configs/finetune/demo.yaml|out/task1-demo|/data|1|a=1 b=1 b=2 optim.lr=5.0e-4"
    not_array = _bash("source launch/common.sh; passreid_stage=finetune; passreid_config=x.txt; passreid_apply_list")
    assert not_array.returncode == 2 and "submit it as an array" in not_array.stderr


def test_pipeline_dry_run_prints_chained_sbatch_commands(profile_file, tmp_path):
    done = subprocess.run([str(LAUNCH / "pipeline.sh"), "--profile", str(profile_file), "--run-dir", "RUN",
                           "--stages", "pretrain,finetune,usl,uda", "--dry-run", "--finetune-opts", "train.max_iters=4",
                           "--uda-config", str(REPO / "configs" / "uda" / "market2msmt_pass_vit_s.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("sbatch --parsable") for line in lines)
    pretrain, finetune, usl, uda = lines
    assert "--dependency" not in pretrain and "--partition=debug" in pretrain and "launch/pretrain.sh" in pretrain
    # The demo recipes read the demo worlds (rendered into RUN/worlds when not a dry run); a real recipe does not.
    assert "--data-root RUN/worlds/world/pool monitor.root=RUN/worlds/monitor_world/pool" in pretrain
    assert "--data-root RUN/worlds/usl_world/market" in usl and "RUN/worlds" not in uda
    assert "--dependency=afterok:\\<pretrain-job-id\\>" in finetune
    assert "model.pretrained=RUN/pretrain/backbone_final.pth" in finetune and "train.max_iters=4" in finetune
    assert "--dependency=afterok:\\<pretrain-job-id\\>" in usl and "launch/usl.sh" in usl
    assert "--dependency=afterok:\\<finetune-job-id\\>" in uda and "model.init_from=RUN/finetune/model_final.pth" in uda
    assert not (tmp_path / "RUN").exists()  # a dry run creates nothing


def test_pipeline_checks_every_stage_before_queueing_any(profile_file, tmp_path):
    # A typo in the last stage's overrides stops the pipeline before pre-training is queued: nothing is
    # submitted and nothing is written (not even the run folder or the demo worlds).
    done = subprocess.run([str(LAUNCH / "pipeline.sh"), "--profile", str(profile_file), "--run-dir", "RUN",
                           "--stages", "pretrain,finetune,uda", "--uda-opts", "optim.lrr=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in done.stderr
    assert "the arguments of stage uda do not load (above); nothing was submitted" in done.stderr
    assert not (tmp_path / "RUN").exists()
    # A stage whose upstream export neither exists nor is coming stops the pipeline before its first job too.
    done = subprocess.run([str(LAUNCH / "pipeline.sh"), "--profile", str(profile_file), "--run-dir", "RUN",
                           "--stages", "pretrain,uda"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "uda starts from RUN/finetune/model_final.pth: list finetune before uda, or run it first" in done.stderr
    assert not (tmp_path / "RUN").exists()


def test_submitit_checks_the_stage_arguments_before_submitting(submit_module, tmp_path, capsys):
    local = str(LAUNCH / "profiles" / "local.yaml")
    demo = str(REPO / "configs" / "finetune" / "demo.yaml")
    assert submit_module.main(["finetune", "--profile", local, "--config-file", demo, "--output-dir",
                               str(tmp_path / "ft"), "optim.lr=fast"]) == 2
    assert "the arguments of stage finetune do not load (nothing was submitted): " in capsys.readouterr().err
    assert submit_module.main(["pipeline", "--profile", local, "--run-dir", str(tmp_path / "run"),
                               "--stages", "pretrain,finetune", "--finetune-opts", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert submit_module.main(["pipeline", "--profile", local, "--run-dir", str(tmp_path / "run"),
                               "--stages", "pretrain,uda"]) == 2
    assert f"uda starts from {tmp_path / 'run' / 'finetune' / 'model_final.pth'}: list finetune before uda" \
        in capsys.readouterr().err
    assert not (tmp_path / "ft").exists() and not (tmp_path / "run").exists()  # no job, no demo worlds


@pytest.mark.slow
def test_a_job_that_stops_on_bad_input_reports_the_stages_reason(submit_module, tmp_path, capsys):
    # The local executor runs the job here; its arguments load, but its data folder is missing.
    out = tmp_path / "ft"
    assert submit_module.main(["finetune", "--profile", str(LAUNCH / "profiles" / "local.yaml"), "--config-file",
                               str(REPO / "configs" / "finetune" / "demo.yaml"), "--output-dir", str(out),
                               "--data-root", str(tmp_path / "no_such_data"), "--wait"]) == 2
    err = capsys.readouterr().err
    assert "finetune stopped with exit status 2: market1501: dataset folder not found for root" in err
    assert "Traceback" not in err and f"its log: {out / 'submitit'}" in err


def test_submitit_pipeline_points_the_demo_recipes_at_the_demo_worlds(submit_module, tmp_path):
    run = tmp_path / "run"
    demo = submit_module.DEMO_CONFIGS["finetune"]
    argv = submit_module.pipeline_argv("finetune", run, demo, None, [])
    assert argv[argv.index("--data-root") + 1] == str(run / "worlds" / "world" / "market")
    # A folder given on the command line or in the stage's overrides wins; nothing points at the worlds then.
    assert "--data-root" not in submit_module.pipeline_argv("finetune", run, demo, None, ["data.root=/d"])
    # The demo recipe named relative to the checkout (as the sbatch scripts accept it) is recognised too.
    relative = submit_module.pipeline_argv("finetune", run, "configs/finetune/demo.yaml", None, [])
    assert str(run / "worlds" / "world" / "market") in relative
    given = submit_module.pipeline_argv("finetune", run, demo, "/data", [])
    assert given[given.index("--data-root") + 1] == "/data" and str(run / "worlds") not in " ".join(given)


# ---------------------------------------------------------------------------------------------- real cluster
@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_runs_pretrain_then_finetune_and_usl_as_chained_jobs(slurm, profile_file, pool_list,
                                                                      synthetic_world, tmp_path):
    stages = ["pretrain", "finetune", "usl"]
    if not (REPO / "usl" / "train.py").is_file():
        pytest.skip("usl/train.py is absent: the USL stage is not in this checkout")
    pretrain_opts = [*PRETRAIN_TINY, f"data.root={synthetic_world / 'pool'}", f"data.file_list={pool_list}"]
    finetune_opts = [*FINETUNE_FAST, "train.max_iters=4", f"data.root={synthetic_world}/market"]
    usl_opts = [*USL_TINY, f"data.root={synthetic_world}/market"]
    done = subprocess.run([str(LAUNCH / "pipeline.sh"), "--profile", str(profile_file), "--run-dir", "run",
                           "--stages", ",".join(stages), "--pretrain-opts", " ".join(pretrain_opts),
                           "--finetune-opts", " ".join(finetune_opts), "--usl-opts", " ".join(usl_opts)],
                          capture_output=True, text=True, cwd=tmp_path, env=slurm.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    jobs = {}
    for line in done.stdout.splitlines():
        stage, job_id, output_dir = line.split()
        jobs[stage] = job_id
        assert output_dir == f"run/{stage}"
    assert list(jobs) == stages
    assert f"afterok:{jobs['pretrain']}" in slurm.job(jobs["finetune"])["Dependency"]

    infos = {stage: _finished_ok(slurm, jobs[stage]) for stage in stages}
    run = tmp_path / "run"
    export = run / "pretrain" / "backbone_final.pth"
    assert export.is_file()
    for stage in ("finetune", "usl"):  # started after pre-training ended, from its export
        assert infos[stage]["StartTime"] >= infos["pretrain"]["EndTime"]
        config = yaml.safe_load((run / stage / "config.yaml").read_text())
        assert config["model"]["pretrained"] == "run/pretrain/backbone_final.pth"
        assert (run / stage / "model_final.pth").is_file()
    final = _records(run / "usl", "eval")[-1]
    assert EVAL_KEYS <= set(final) and 0.0 <= final["mAP"] <= 1.0
    assert sorted(p.name for p in (run / "logs").iterdir()) == sorted(
        f"passreid-{stage}-{jobs[stage]}.out" for stage in stages)


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_runs_each_list_entry_in_its_own_output_dir(slurm, synthetic_world, tmp_path):
    array_id = _sbatch(slurm, tmp_path, *SMALL_JOB, "--array=0-1", f"--output={tmp_path}/%x-%A_%a.out",
                       str(LAUNCH / "finetune.sh"), str(REPO / "configs" / "finetune" / "sweep_demo.txt"),
                       "--output-dir", "sweep", *FINETUNE_FAST, "train.max_iters=3", f"data.root={synthetic_world}/market")
    # the list names its configs relative to the checkout; the jobs run in tmp_path
    deadline = time.monotonic() + JOB_TIMEOUT_S
    tasks = slurm.array_jobs(array_id)
    while time.monotonic() < deadline and (len(tasks) < 2 or any(t["JobState"] not in ("COMPLETED", "FAILED",
                                                                                       "CANCELLED") for t in tasks)):
        time.sleep(2)
        tasks = slurm.array_jobs(array_id)
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "COMPLETED"], \
        "\n".join(slurm.describe_failure(t) for t in tasks)
    outputs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert outputs == ["task0-demo", "task1-demo"]
    for task, lr in ((0, 1.0e-3), (1, 5.0e-4)):
        run = tmp_path / "sweep" / f"task{task}-demo"
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(lr)
        assert (run / "model_final.pth").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_srun_job_trains_with_ddp_over_gloo(slurm, synthetic_world, tmp_path):
    options = [o for o in SMALL_JOB if not o.startswith("--ntasks-per-node")] + ["--ntasks-per-node=2"]
    job_id = _sbatch(slurm, tmp_path, *options, f"--output={tmp_path}/ddp-%j.out", str(LAUNCH / "finetune.sh"),
                     str(REPO / "configs" / "finetune" / "demo.yaml"), "--output-dir", "ddp", *FINETUNE_FAST,
                     "train.max_iters=3", "data.batch_size=16", f"data.root={synthetic_world}/market")
    info = _finished_ok(slurm, job_id)
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "2 process(es) on cpu" in log  # world size from SLURM_STEP_NUM_TASKS; CPU -> gloo
    assert "2 task(s)" in Path(info["StdOut"]).read_text()
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # gathered from both ranks over the process group
    assert (tmp_path / "ddp" / "model_final.pth").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_is_requeued_and_its_loss_curve_continues_exactly(slurm, synthetic_world, tmp_path):
    # Two loader workers: SIGTERM reaches every process of the job step, the workers included.
    common = [*FINETUNE_FAST, "train.max_iters=14", "data.num_workers=2", f"data.root={synthetic_world}/market"]
    script, config = str(LAUNCH / "finetune.sh"), str(REPO / "configs" / "finetune" / "demo.yaml")
    reference = _sbatch(slurm, tmp_path, *SMALL_JOB, f"--output={tmp_path}/reference-%j.out", script, config,
                        "--output-dir", "reference", *common)
    preempted = _sbatch(slurm, tmp_path, *SMALL_JOB, f"--output={tmp_path}/preempted-%j.out", script, config,
                        "--output-dir", "preempted", *common)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and len(_records(tmp_path / "preempted", "train")) >= 3):
        assert time.monotonic() < deadline, slurm.describe_failure(slurm.job(preempted))
        time.sleep(0.3)
    slurm.run("scancel", "--signal=TERM", preempted)  # what pre-emption sends every process of the step

    info = _finished_ok(slurm, preempted)
    _finished_ok(slurm, reference)
    assert int(info["Restarts"]) == 1
    log = Path(info["StdOut"]).read_text()
    assert "requeued SLURM job" in log and "(restart 1)" in log
    assert "Traceback" not in log and "killed by signal" not in log
    stopped_at = int(re.search(r"stopped by a pre-emption signal at iteration (\d+)", log).group(1))
    assert 3 <= stopped_at < 14  # it did stop mid-run, and the requeued job did the rest
    expected = {r["step"]: r["loss"] for r in _records(tmp_path / "reference", "train")}
    continued = {r["step"]: r["loss"] for r in _records(tmp_path / "preempted", "train")}
    assert sorted(continued) == list(range(1, 15))
    for step in range(1, 15):
        assert continued[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_warning_signal_checkpoints_requeues_and_the_job_continues(slurm, synthetic_world, tmp_path):
    # --time=2 --signal=TERM@60: SLURM signals the step (workers included) at its first time-limit check once
    # less than 60 s plus its 30 s check period are left, i.e. 30-40 s in, long before this run could end
    # (the set-up is over by then); the requeued job resumes. Once it has trained past the checkpoint the
    # test cancels it (loss exactness after a SIGTERM is the test above).
    overrides = [*FINETUNE_FAST, "train.epochs=1000", "data.num_workers=2", f"data.root={synthetic_world}/market"]
    small_job = [option for option in SMALL_JOB if not option.startswith("--time=")]
    job = _sbatch(slurm, tmp_path, *small_job, "--time=2", "--signal=TERM@60", f"--output={tmp_path}/job-%j.out",
                  str(LAUNCH / "finetune.sh"), str(REPO / "configs" / "finetune" / "demo.yaml"),
                  "--output-dir", "limited", *overrides)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    log = Path()
    while True:
        info = slurm.job(job)
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), slurm.describe_failure(info)
        assert time.monotonic() < deadline, slurm.describe_failure(info)
        log = Path(info.get("StdOut", tmp_path / "missing"))
        text = log.read_text() if log.is_file() else ""
        stopped = re.search(r"stopped by a pre-emption signal at iteration (\d+)", text)
        steps = [r["step"] for r in _records(tmp_path / "limited", "train")] if stopped else []
        if stopped and int(info["Restarts"]) >= 1 and steps and steps[-1] > int(stopped.group(1)) + 1:
            break
        time.sleep(0.5)
    slurm.run("scancel", job)
    assert "requeued SLURM job" in text and "Traceback" not in text and "killed by signal" not in text
    assert steps == list(range(1, len(steps) + 1))  # resumed after the checkpoint: no step lost or repeated


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_runs_a_stage_on_the_cluster_through_a_preemption(slurm, submit_module, profile_file,
                                                                   synthetic_world, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "submitit_finetune"
    argv = ["--config-file", str(REPO / "configs" / "finetune" / "demo.yaml"), "--output-dir", str(out),
            *FINETUNE_FAST, "train.max_iters=12", f"data.root={synthetic_world}/market"]
    job = submit_module.submit_stage("finetune", argv, submit_module.load_profile(profile_file), tmp_path / "logs")
    info = slurm.job(job.job_id)
    assert info["JobName"] == "passreid-finetune" and info["Requeue"] == "1"
    deadline = time.monotonic() + JOB_TIMEOUT_S

    def check_progress():
        state = slurm.job(job.job_id).get("JobState")
        assert state not in ("FAILED", "CANCELLED"), f"job {state}\n{job.stderr()}"
        assert time.monotonic() < deadline, f"no result after {JOB_TIMEOUT_S} s\n{job.stderr()}"
        time.sleep(0.5)

    while not ((out / "metrics.jsonl").is_file() and len(_records(out, "train")) >= 2):
        check_progress()
    slurm.run("scancel", "--signal=USR1", job.job_id)  # submitit's --signal=USR1@N, early
    while not job.done():
        check_progress()

    result = job.result()  # from the requeued run: the pre-empted one exits without a result
    assert int(slurm.job(job.job_id)["Restarts"]) == 1
    assert result["stage"] == "finetune" and Path(result["final"]) == out / "model_final.pth"
    assert Path(result["final"]).is_file()
    assert EVAL_KEYS <= set(result["metrics"]["eval"])
    assert result["metrics"]["train"]["step"] == 12
    assert [r["step"] for r in _records(out, "train")] == list(range(1, 13))  # resumed, no step twice


def test_submitit_task_resubmits_itself_on_checkpoint(submit_module, tmp_path):
    task = submit_module.StageTask("finetune", ["--config-file", "c.yaml", "--output-dir", str(tmp_path)])
    delayed = task.checkpoint()
    assert isinstance(delayed.function, submit_module.StageTask) and delayed.function is not task
    assert (delayed.function.stage, delayed.function.argv) == (task.stage, task.argv)
    with pytest.raises(ValueError, match="--output-dir"):
        submit_module.StageTask("finetune", ["--config-file", "c.yaml"])


def test_no_resume_applies_to_the_first_start_of_a_submitit_job_only(submit_module, tmp_path, monkeypatch):
    argv = ["--config-file", "c.yaml", "--output-dir", str(tmp_path), "--no-resume", "train.epochs=2"]
    task = submit_module.StageTask("usl", argv)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert task.argv_for_this_start() == argv
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert task.argv_for_this_start() == argv
    resumed = [a for a in argv if a != "--no-resume"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued by the stage's own scontrol requeue
    assert task.argv_for_this_start() == resumed
    assert task.checkpoint().function.argv == resumed  # resubmitted by submitit on pre-emption


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
