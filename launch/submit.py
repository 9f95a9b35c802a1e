#!/usr/bin/env python
"""Submit passreid stages through submitit, with cluster profiles (launch/profiles/*.yaml).

    python launch/submit.py finetune --profile launch/profiles/mycluster.yaml \
        --config-file configs/finetune/market1501/pass_vit_s_256.yaml --output-dir runs/ft --data-root /data \
        model.pretrained=runs/pt/backbone_final.pth
    python launch/submit.py pipeline --profile launch/profiles/mycluster.yaml --run-dir runs/pipeline \
        [--stages pretrain,finetune,usl,uda] [--pretrain-config F] [--finetune-opts "k=v ..."] [--wait]
    python launch/submit.py sbatch-args --profile launch/profiles/mycluster.yaml --stage pretrain

A profile with ``cluster: local`` runs the job on this machine (submitit's local executor); ``slurm``
submits it with sbatch (one srun task per GPU, ranks from SLURM). Each job runs the stage's entry point
(``<stage>/train.py``) in-process. Pre-emption: SLURM sends SIGUSR1 ``signal_delay_s`` before the time
limit; during training the stage writes its checkpoint and requeues the job, at any other moment
submitit calls :meth:`StageTask.checkpoint`, which resubmits the same task. Either way the job starts
again with the same output directory and resumes from ``checkpoint.pth``.

``sbatch-args`` prints a profile's sbatch options, one per line (launch/pipeline.sh uses them, so both
launch paths read the same profile).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

# submitit's pre-emption signal defaults to USR2; the stages stop cleanly on USR1 (and SIGTERM). The
# variable is read when submitit is imported, here and (exported with the job's environment) in the job.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
import cloudpickle  # noqa: E402
import submitit  # noqa: E402
from submitit.core.utils import FailedJobError  # noqa: E402

from passreid.cli import error_boundary, last_reported_error  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = REPO_ROOT / "launch" / "profiles" / "default.yaml"
logger = logging.getLogger("passreid.launch")


@dataclass(frozen=True)
class Stage:
    """A stage's entry point, its end-of-run artifact, and how the next stages start from it."""

    entry: str  # path relative to the repository root
    final_file: str  # written into the output directory when the run finished
    # (upstream stage, the override naming the upstream stage's final file) for pipelines
    starts_from: tuple[str, str] | None = None


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain/train.py", "backbone_final.pth"),
    "finetune": Stage("finetune/train.py", "model_final.pth", ("pretrain", "model.pretrained")),
    "usl": Stage("usl/train.py", "model_final.pth", ("pretrain", "model.pretrained")),
    "uda": Stage("uda/train.py", "model_final.pth", ("finetune", "model.init_from")),
}
DEMO_CONFIGS = {stage: str(REPO_ROOT / "configs" / stage / "demo.yaml") for stage in STAGES}
DEMO_WORLDS_DIR = "worlds"  # <run-dir>/worlds: the demo worlds a pipeline of demo recipes reads


class LaunchError(ValueError):
    """A request that cannot be submitted as given: the profile, the stages or their arguments."""


# ---------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class SlurmSettings:
    """What one job asks for (the ``slurm:`` block of a profile, with its stage's changes applied)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 8
    cpus_per_task: int = 10
    mem_gb: float = 0
    time_min: int = 1440
    signal_delay_s: int = 300
    additional: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """A cluster profile file: executor kind, default resources, per-stage changes, job environment."""

    cluster: str
    slurm: SlurmSettings
    env: Mapping[str, str]
    stages: Mapping[str, Mapping[str, Any]]
    path: Path

    def settings(self, stage: str) -> SlurmSettings:
        """The resources of ``stage``'s jobs."""
        return _settings(self.slurm, self.stages.get(stage, {}), f"{self.path}: stages.{stage}")


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and check a profile YAML (see launch/profiles/default.yaml for every key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} not found (see launch/profiles/)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise LaunchError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - {"cluster", "slurm", "env", "stages"}
    if unknown:
        raise LaunchError(f"{path}: unknown keys {sorted(unknown)}; expected cluster, slurm, env, stages")
    cluster = raw.get("cluster", "slurm")
    if cluster not in ("slurm", "local"):
        raise LaunchError(f"{path}: cluster must be 'slurm' or 'local', got {cluster!r}")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict) or set(stages) - set(STAGES):
        raise LaunchError(f"{path}: stages must map stage names ({', '.join(STAGES)}) to changes, got {stages!r}")
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise LaunchError(f"{path}: env must be a mapping of variable names to values")
    profile = Profile(cluster, _settings(SlurmSettings(), raw.get("slurm") or {}, f"{path}: slurm"),
                      {str(k): str(v) for k, v in env.items()}, stages, path)
    for stage in stages:
        profile.settings(stage)  # report bad stage entries now, not at submission
    return profile


def _settings(base: SlurmSettings, changes: Mapping[str, Any], where: str) -> SlurmSettings:
    if not isinstance(changes, Mapping):
        raise LaunchError(f"{where}: expected a mapping, got {changes!r}")
    known = {f.name for f in fields(SlurmSettings)}
    unknown = set(changes) - known
    if unknown:
        raise LaunchError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    values = {}
    for key, value in changes.items():
        if value is None:
            continue  # keep the default
        expected = _SETTING_TYPES[type(getattr(base, key))]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise LaunchError(f"{where}.{key}: expected {expected}, got {value!r}")
        values[key] = value
    settings = replace(base, **values)
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
        if getattr(settings, key) < 1:
            raise LaunchError(f"{where}.{key} must be >= 1, got {getattr(settings, key)}")
    if settings.gpus_per_node < 0 or settings.mem_gb < 0 or settings.signal_delay_s < 0:
        raise LaunchError(f"{where}: gpus_per_node, mem_gb and signal_delay_s must be >= 0")
    return settings


# YAML types accepted for a setting, by the type of its default.
_SETTING_TYPES: dict[type, Any] = {str: str, int: int, float: (int, float), dict: Mapping}


def sbatch_options(profile: Profile, stage: str) -> list[str]:
    """The sbatch options for ``stage`` under ``profile`` (they override the scripts' #SBATCH lines)."""
    s = profile.settings(stage)
    options = [f"--{name}={value}" for name, value in (("partition", s.partition), ("account", s.account),
                                                        ("qos", s.qos), ("constraint", s.constraint),
                                                        ("exclude", s.exclude)) if value]
    mem = f"{int(s.mem_gb)}G" if float(s.mem_gb).is_integer() else f"{int(s.mem_gb * 1024)}M"
    options += [f"--nodes={s.nodes}", f"--ntasks-per-node={s.tasks_per_node}", f"--gpus-per-node={s.gpus_per_node}",
                f"--cpus-per-task={s.cpus_per_task}", f"--mem={mem}", f"--time={s.time_min}",
                f"--signal=USR1@{s.signal_delay_s}"]
    # As submitit writes them: '_' in a name becomes '-', true is a bare flag; false leaves the option out.
    options += [f"--{str(name).replace('_', '-')}" + ("" if value is True else f"={value}")
                for name, value in s.additional.items() if value is not False]
    if profile.env:
        bad = [name for name, value in profile.env.items() if "," in value]
        if bad:
            raise LaunchError(f"{profile.path}: env values must not contain ',' for sbatch --export: {bad}")
        options.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in profile.env.items()))
    return options


def executor_parameters(profile: Profile, stage: str) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for ``stage`` under ``profile``."""
    s = profile.settings(stage)
    common = {"nodes": s.nodes, "tasks_per_node": s.tasks_per_node, "cpus_per_task": s.cpus_per_task,
              "gpus_per_node": s.gpus_per_node, "timeout_min": s.time_min, "name": f"passreid-{stage}"}
    if profile.cluster == "local":
        return common
    slurm = {f"slurm_{name}": value for name, value in (("partition", s.partition), ("account", s.account),
                                                        ("qos", s.qos), ("constraint", s.constraint),
                                                        ("exclude", s.exclude)) if value}
    setup = [f"export {name}={shlex.quote(value)}" for name, value in profile.env.items()]
    return {**common, **slurm, "mem_gb": s.mem_gb, "slurm_signal_delay_s": s.signal_delay_s,
            "slurm_additional_parameters": {"requeue": True, **{name: value for name, value in s.additional.items()
                                                                 if value is not False}},
            "slurm_setup": setup}


# ---------------------------------------------------------------------------------------------- the job
class StageTask:
    """One stage run as a submitit job; ``checkpoint()`` makes it requeueable with the same arguments."""

    def __init__(self, stage: str, argv: Sequence[str]):
        if stage not in STAGES:
            raise LaunchError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        self.stage = stage
        self.argv = list(argv)
        self.output_dir = Path(_option_value(self.argv, "--output-dir"))

    def __call__(self) -> dict[str, Any]:
        """Run (or resume) the stage; the final artifact and the last metrics of each split.

        A run stopped by a pre-emption signal has requeued its SLURM job: this process then exits
        without a result (the requeued job delivers it), as submitit's own pre-emption handling does.
        """
        from passreid.dist import resolve_dist_env  # imports torch: only in the job, not at submission

        _export_local_dist_env()
        entry = _load_entry(self.stage)
        status = entry.main(self.argv_for_this_start())
        if status:  # the stage stopped on a mistake in its input and said why (also in <output-dir>/log.txt)
            reason = (last_reported_error() or "see the job's log").splitlines()[0]
            raise RuntimeError(f"{self.stage} stopped with exit status {status}: {reason}")
        rank = resolve_dist_env().rank
        if rank != 0:  # rank 0 writes the outputs and answers for the job
            return {"stage": self.stage, "output_dir": str(self.output_dir), "rank": rank}
        final = self.output_dir / STAGES[self.stage].final_file
        if not final.is_file():
            if os.environ.get("SLURM_JOB_ID"):
                logger.warning("%s stopped before writing %s: the job was requeued and resumes from its "
                               "checkpoint", self.stage, final)
                sys.exit(0)
            raise RuntimeError(f"{self.stage} stopped before writing {final}; run it again to resume")
        return {"stage": self.stage, "output_dir": str(self.output_dir), "final": str(final),
                "metrics": last_metrics(self.output_dir)}

    def argv_for_this_start(self) -> list[str]:
        """The stage's arguments for this start of the job: ``--no-resume`` applies to the first start only
        (a job requeued by SLURM, ``SLURM_RESTART_COUNT`` > 0, continues from its checkpoint), as in
        launch/common.sh."""
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return [arg for arg in self.argv if arg != "--no-resume"]
        return list(self.argv)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption/timeout outside the training loop: the same task again, without
        ``--no-resume`` (it resumes from the output directory's checkpoint)."""
        return submitit.helpers.DelayedSubmission(
            StageTask(self.stage, [arg for arg in self.argv if arg != "--no-resume"]))

    def __repr__(self) -> str:
        return f"StageTask({self.stage!r}, {self.argv!r})"


# The job unpickles StageTask where launch/ is not importable: ship this module's code with the job
# (cloudpickle already does so for __main__ and for modules missing from sys.modules).
if __name__ != "__main__" and __name__ in sys.modules:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def last_metrics(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The last ``metrics.jsonl`` record of each split (``{}`` when there is no file)."""
    path = Path(output_dir) / "metrics.jsonl"
    latest: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record.get("split", "train")] = record
    return latest


def _load_entry(stage: str) -> ModuleType:
    path = REPO_ROOT / STAGES[stage].entry
    if not path.is_file():
        raise FileNotFoundError(f"entry point of stage {stage} not found: {path}")
    spec = importlib.util.spec_from_file_location(f"passreid_entry_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export_local_dist_env() -> None:
    """Several tasks of submitit's local executor: give them torchrun's variables (SLURM gives its own)."""
    if os.environ.get("SLURM_JOB_ID") or "RANK" in os.environ:
        return
    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return
    port = 20000 + int("".join(ch for ch in str(job.job_id) if ch.isdigit()) or 0) % 20000
    os.environ.update({"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks),
                       "LOCAL_RANK": str(job.local_rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _option_value(argv: Sequence[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise LaunchError(f"the stage arguments need {name} (the job resumes from that folder): {list(argv)}")


# ---------------------------------------------------------------------------------------------- submission
def make_executor(profile: Profile, stage: str, folder: str | os.PathLike,
                  dependency: str | None = None) -> submitit.Executor:
    """A submitit executor for ``stage``'s jobs under ``profile``, logs in ``folder``.

    ``dependency``: a SLURM job id this job waits for (``afterok``; cancelled if that one fails).
    """
    if profile.cluster == "local":
        if dependency:
            raise ValueError("the local executor has no job dependencies; wait for the previous job instead")
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        for name, value in profile.env.items():
            os.environ.setdefault(name, value)  # the local executor starts the job with this environment
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    parameters = executor_parameters(profile, stage)
    if dependency:
        extra = dict(parameters["slurm_additional_parameters"])
        extra.update({"dependency": f"afterok:{dependency}", "kill-on-invalid-dep": "yes"})
        parameters["slurm_additional_parameters"] = extra
    executor.update_parameters(**parameters)
    return executor


def job_result(job: submitit.Job, stage: str) -> dict[str, Any]:
    """Wait for ``job`` and return task 0's result (one per task); a failed job raises :class:`LaunchError` with
    the last line of its error and its log file, not submitit's whole trace."""
    try:
        return job.results()[0]
    except FailedJobError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", line)), None)
        reason = reason or (lines[0] if lines else "no reason given")
        raise LaunchError(f"{stage} job {job.job_id} failed: {reason}; its log: {job.paths.stderr}") from None


def check_stage_arguments(stage: str, argv: Sequence[str]) -> None:
    """Load ``stage``'s config from ``argv`` now, so that a wrong key, value or recipe fails at submission, not
    when the job leaves the queue. Runs the entry point's ``--print-config`` in a subprocess (torch is not
    imported here); paths the job will create (an upstream stage's export) are not required to exist."""
    command = [sys.executable, str(REPO_ROOT / STAGES[stage].entry), *argv, "--print-config"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1].split(": error: ", 1)[-1] if lines else f"exit status {result.returncode}"
        raise LaunchError(f"the arguments of stage {stage} do not load (nothing was submitted): {reason}")


def submit_stage(stage: str, argv: Sequence[str], profile: Profile, folder: str | os.PathLike,
                 dependency: str | None = None) -> submitit.Job:
    """Submit one stage run (``argv``: its entry point's arguments, with ``--output-dir``); the caller has
    checked them (:func:`check_stage_arguments`)."""
    executor = make_executor(profile, stage, folder, dependency)
    return executor.submit(StageTask(stage, argv))


def _recipe_path(config: str) -> str:
    """``config`` as the sbatch scripts find it: the working directory first, then the checkout."""
    if not Path(config).is_absolute() and not Path(config).is_file() and (REPO_ROOT / config).is_file():
        return str(REPO_ROOT / config)
    return config


def reads_the_demo_worlds(stage: str, config: str, data_root: str | None, opts: Sequence[str]) -> bool:
    """Whether ``stage`` runs its demo recipe with no folder given: the pipeline then points it at the demo worlds
    (rendered once into ``<run-dir>/worlds`` by :mod:`passreid.demo`)."""
    is_demo = Path(_recipe_path(config)).resolve() == Path(DEMO_CONFIGS[stage]).resolve()
    return is_demo and not data_root and not any(opt.startswith("data.root=") for opt in opts)


def pipeline_argv(stage: str, run_dir: Path, config: str, data_root: str | None, opts: Sequence[str]) -> list[str]:
    """Arguments of ``stage`` in a pipeline under ``run_dir`` (it starts from its upstream stage's export)."""
    config = _recipe_path(config)
    argv = ["--config-file", config, "--output-dir", str(run_dir / stage)]
    if data_root:
        argv += ["--data-root", data_root]
    elif reads_the_demo_worlds(stage, config, data_root, opts):
        from passreid.demo import demo_data_arguments

        argv += demo_data_arguments(stage, run_dir / DEMO_WORLDS_DIR)
    upstream = STAGES[stage].starts_from
    if upstream is not None:
        source, key = upstream
        argv.append(f"{key}={run_dir / source / STAGES[source].final_file}")
    return argv + list(opts)


def submit_pipeline(stages: Sequence[str], run_dir: Path, profile: Profile, configs: Mapping[str, str],
                    data_root: str | None = None, opts: Mapping[str, Sequence[str]] | None = None,
                    ) -> dict[str, submitit.Job]:
    """Submit ``stages`` chained by their exports; SLURM jobs wait with ``afterok``, local ones run in turn."""
    _check_stage_order(stages)
    argvs = {stage: pipeline_argv(stage, run_dir, configs.get(stage, DEMO_CONFIGS[stage]), data_root,
                                  (opts or {}).get(stage, ())) for stage in stages}
    for stage in stages:  # every stage before the first job is queued
        upstream = STAGES[stage].starts_from
        if upstream is not None and upstream[0] not in stages:  # then its export must be there already
            export = run_dir / upstream[0] / STAGES[upstream[0]].final_file
            if not export.is_file():
                raise LaunchError(f"{stage} starts from {export}: list {upstream[0]} before {stage}, or run it first")
        check_stage_arguments(stage, argvs[stage])
    if any(reads_the_demo_worlds(stage, configs.get(stage, DEMO_CONFIGS[stage]), data_root, (opts or {}).get(stage, ()))
           for stage in stages):
        from passreid.demo import DEMO_WORLDS, render_demo_world

        for name in DEMO_WORLDS:  # before any job starts; kept when already there
            render_demo_world(name, run_dir / DEMO_WORLDS_DIR)
    jobs: dict[str, submitit.Job] = {}
    for stage in stages:
        upstream = STAGES[stage].starts_from
        dependency = None
        if upstream is not None and upstream[0] in jobs:
            if profile.cluster == "local":
                jobs[upstream[0]].results()  # waits; raises if the upstream stage failed
            else:
                dependency = jobs[upstream[0]].job_id
        jobs[stage] = submit_stage(stage, argvs[stage], profile, run_dir / "submitit", dependency)
    return jobs


def _check_stage_order(stages: Sequence[str]) -> None:
    for i, stage in enumerate(stages):
        if stage not in STAGES:
            raise LaunchError(f"unknown stage {stage!r}; expected some of {', '.join(STAGES)}")
        if stage in stages[:i]:
            raise LaunchError(f"stage {stage} listed twice")
        upstream = STAGES[stage].starts_from
        if upstream is not None and upstream[0] in stages[i:]:
            raise LaunchError(f"{stage} starts from {upstream[0]}'s export: list {upstream[0]} first")


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"submit one {stage} run; other arguments go to {STAGES[stage].entry}")
        sub.add_argument("--profile", default=str(DEFAULT_PROFILE))
        sub.add_argument("--folder", default=None, help="submitit logs (default <output-dir>/submitit)")
        sub.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    pipe = commands.add_parser("pipeline", help="submit chained stages")
    pipe.add_argument("--profile", default=str(DEFAULT_PROFILE))
    pipe.add_argument("--run-dir", required=True, help="each stage writes <run-dir>/<stage>")
    pipe.add_argument("--stages", default="pretrain,finetune,usl,uda")
    pipe.add_argument("--data-root", default=None)
    pipe.add_argument("--wait", action="store_true", help="wait for the last job and print the results")
    for stage in STAGES:
        pipe.add_argument(f"--{stage}-config", default=DEMO_CONFIGS[stage])
        pipe.add_argument(f"--{stage}-opts", default="", help="space-separated key=value overrides")
    args_cmd = commands.add_parser("sbatch-args", help="print a profile's sbatch options, one per line")
    args_cmd.add_argument("--profile", default=str(DEFAULT_PROFILE))
    args_cmd.add_argument("--stage", required=True, choices=sorted(STAGES))
    return parser


@error_boundary(extra=(LaunchError, FailedJobError))  # FailedJobError: sbatch refused the job (it says why)
def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, rest = _parser().parse_known_args(argv)
    profile = load_profile(args.profile)
    if args.command == "sbatch-args":
        print("\n".join(sbatch_options(profile, args.stage)))
        return 0
    if args.command == "pipeline":
        if rest:
            raise LaunchError(f"unexpected arguments: {rest}")
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        configs = {stage: getattr(args, f"{stage}_config") for stage in STAGES}
        opts = {stage: shlex.split(getattr(args, f"{stage}_opts")) for stage in STAGES}
        jobs = submit_pipeline(stages, Path(args.run_dir), profile, configs, args.data_root, opts)
        for stage, job in jobs.items():
            print(f"{stage}: job {job.job_id} -> {Path(args.run_dir) / stage}")
        if args.wait:
            print(json.dumps({stage: job_result(job, stage) for stage, job in jobs.items()}, indent=2))
        return 0
    folder = args.folder or str(Path(_option_value(rest, "--output-dir")) / "submitit")
    check_stage_arguments(args.command, rest)
    job = submit_stage(args.command, rest, profile, folder)
    print(f"{args.command}: job {job.job_id}; submitit logs in {folder}")
    if args.wait:
        print(json.dumps(job_result(job, args.command), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
