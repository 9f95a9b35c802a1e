"""passreid.dist: node lists, environment resolution, single-process helpers, real 2-process gloo."""
from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import pytest

from _ports import free_port
from _spawn import group_threads, start_workers, wait_for_workers
import torch
import torch.distributed as dist
from torch import nn

from passreid.dist import (DistEnv, all_gather_by_index, all_reduce_mean, barrier, broadcast_object,
                           destroy, expand_nodelist, get_local_rank, get_rank, get_world_size,
                           init_distributed, is_main_process, resolve_dist_env, slurm_master_port)
from passreid.engine import NonFiniteLossError, check_finite_on_every_rank

# ---------------------------------------------------------------------------------- node lists


@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-04,07],cpu1,node-[3-4]",
     ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu1", "node-3", "node-4"]),
    ("node1", ["node1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("gpu[5]", ["gpu5"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("rack1-gpu[3,1]", ["rack1-gpu3", "rack1-gpu1"]),
    ("a[1-2],b[01-02]", ["a1", "a2", "b01", "b02"]),
    (" host.example.org ", ["host.example.org"]),
    ("x[1-2]-ib", ["x1-ib", "x2-ib"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty node list"),
    ("a,,b", "empty host name"),
    ("a,", "empty host name"),
    ("gpu[01-04", "unclosed '\\['"),
    ("gpu01]", "']' without '\\['"),
    ("gpu[]", "empty \\[\\]"),
    ("gpu[4-1]", "descending range '4-1'"),
    ("gpu[a-b]", "bad range 'a-b'"),
    ("gpu[1-]", "bad range '1-'"),
    ("gpu[[1]]", "nested '\\['"),
    ("gpu 1", "invalid character"),
])
def test_expand_nodelist_rejects_malformed_input(text, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(text)


# ---------------------------------------------------------------------------------- resolution

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29400"}
SLURM_STEP = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
              "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_torchrun_variables_win_when_all_set():
    assert resolve_dist_env(TORCHRUN) == DistEnv(3, 8, 1, "10.0.0.5", 29400, "torchrun")


def test_torchrun_inside_a_slurm_allocation_keeps_torchrun_ranks():
    env = resolve_dist_env({**SLURM_STEP, **TORCHRUN})
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 8, 1)


def test_slurm_step():
    env = resolve_dist_env(SLURM_STEP)
    assert env == DistEnv(5, 8, 1, "gpu07", 20000 + 123456 % 20000, "slurm")
    assert env.master_port == 23456


def test_slurm_uses_the_step_size_not_the_allocation_size():
    env = resolve_dist_env({**SLURM_STEP, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
                            "SLURM_STEP_NODELIST": "gpu08"})
    assert (env.world_size, env.master_addr) == (8, "gpu08")


def test_slurm_nodelist_fallbacks_and_master_overrides():
    step = {k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")}
    assert resolve_dist_env({**step, "SLURM_NODELIST": "cn[3-4]"}).master_addr == "cn3"
    assert resolve_dist_env({**step, "SLURM_JOB_NODELIST": "a1,b1"}).master_addr == "a1"
    env = resolve_dist_env({**SLURM_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.source, env.master_addr, env.master_port, env.rank) == ("slurm", "head", 31000, 5)
    with pytest.raises(ValueError, match="cannot find the master host"):
        resolve_dist_env(step)


@pytest.mark.parametrize("job_id, port", [(0, 20000), (1, 20001), (19999, 39999), (20000, 20000),
                                          (123456, 23456), (9876543, 36543)])
def test_slurm_port_derivation(job_id, port):
    assert slurm_master_port(job_id) == port
    assert resolve_dist_env({**SLURM_STEP, "SLURM_JOB_ID": str(job_id)}).master_port == port


def test_slurm_batch_step_runs_alone_with_a_warning():
    batch = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gpu[01-02]"}
    with pytest.warns(RuntimeWarning, match="not started by srun"):
        env = resolve_dist_env(batch)
    assert env == DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one task: nothing to warn about
        assert resolve_dist_env({**batch, "SLURM_NTASKS": "1"}).world_size == 1


def test_partial_torchrun_inside_slurm_uses_slurm_and_warns():
    with pytest.warns(RuntimeWarning, match="ignoring RANK"):
        env = resolve_dist_env({**SLURM_STEP, "RANK": "0"})
    assert (env.source, env.rank) == ("slurm", 5)


def test_partial_torchrun_without_slurm_names_what_is_missing():
    with pytest.raises(ValueError, match=r"RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        resolve_dist_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_process_fallback():
    assert resolve_dist_env({}) == DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    assert resolve_dist_env({"MASTER_PORT": "12345", "RANK": ""}).master_port == 12345


def test_resolve_reads_os_environ_by_default(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert resolve_dist_env() == DistEnv(1, 2, 1, "localhost", 29555, "torchrun")


@pytest.mark.parametrize("environ, message", [
    ({**TORCHRUN, "RANK": "x"}, "RANK must be an integer, got 'x'"),
    ({**TORCHRUN, "RANK": "8"}, "RANK=8 is not below WORLD_SIZE=8"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT must be a TCP port in \[1, 65535\]"),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_STEP_NUM_TASKS=8"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_JOB_ID"}, "neither SLURM_JOB_ID nor MASTER_PORT"),
    ({**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu[1-"}, "SLURM_STEP_NODELIST='gpu\\[1-'"),
])
def test_malformed_values_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_dist_env(environ)


def test_dist_env_validates_itself():
    with pytest.raises(ValueError, match="rank must be in"):
        DistEnv(2, 2, 0, "h", 1, "single")
    with pytest.raises(ValueError, match="master_port"):
        DistEnv(0, 1, 0, "h", 0, "single")


# ---------------------------------------------------------------------------------- one process


def test_single_process_helpers_without_a_group():
    env = init_distributed(DistEnv(0, 1, 0, "127.0.0.1", 29500, "single"), backend="gloo")
    try:
        assert env.world_size == 1 and not dist.is_initialized()
        assert (get_rank(), get_world_size(), get_local_rank(), is_main_process()) == (0, 1, 0, True)
        barrier()
        t = torch.tensor([1.0, 2.0])
        reduced = all_reduce_mean(t)
        assert torch.equal(reduced, t) and reduced.data_ptr() != t.data_ptr()
        assert broadcast_object({"a": 1}) == {"a": 1}
        with pytest.raises(TypeError, match="floating-point"):
            all_reduce_mean(torch.tensor([1, 2]))
    finally:
        destroy()


def test_single_process_gather_restores_order_and_checks_coverage():
    reference = torch.randn(9, 4)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    gathered = all_gather_by_index(reference[order], order, 9)
    assert torch.equal(gathered, reference)
    with pytest.raises(ValueError, match=r"1 of 9 samples were not computed.*\[" + str(int(order[-1])) + r"\]"):
        all_gather_by_index(reference[order[:-1]], order[:-1], 9)
    doubled = torch.cat([order, order[:2]])
    with pytest.raises(ValueError, match="computed more than once"):
        all_gather_by_index(reference[doubled], doubled, 9)
    assert torch.equal(all_gather_by_index(reference[doubled], doubled, 9, allow_duplicates=True), reference)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 9\)"):
        all_gather_by_index(reference, torch.arange(1, 10), 9)
    with pytest.raises(ValueError, match="4 rows but indices has 3"):
        all_gather_by_index(reference[:4], torch.arange(3), 9)


# ---------------------------------------------------------------------------------- two processes (gloo)

TOTAL = 11
PERMUTATION = [7, 2, 9, 0, 4, 10, 5, 1, 8, 3, 6]
SHARDS = {0: PERMUTATION[:7], 1: PERMUTATION[7:]}  # uneven: 7 and 4 rows


def reference_features(total: int = TOTAL) -> torch.Tensor:
    """Row j = features of sample j; distinct, exactly representable values."""
    return torch.arange(total * 6, dtype=torch.float32).reshape(total, 2, 3) * 0.5 - 7.0


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    env = resolve_dist_env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed(env, backend="gloo", timeout=datetime.timedelta(seconds=60))
    results: dict = {"rank": get_rank(), "world": get_world_size(), "main": is_main_process(),
                     "local_rank": get_local_rank()}
    try:
        results["mean"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))
        reference = reference_features()
        index = torch.tensor(SHARDS[rank])
        results["gathered"] = all_gather_by_index(reference[index], index, TOTAL)
        results["gathered_2d"] = all_gather_by_index(reference[index].flatten(1), index, TOTAL)
        # one rank with nothing to contribute
        everything = torch.arange(TOTAL)
        mine = everything if rank == 0 else everything[:0]
        results["gathered_empty_shard"] = all_gather_by_index(reference[mine], mine, TOTAL)
        results["broadcast"] = broadcast_object({"epoch": 3, "ids": [1, 2]} if rank == 0 else None)
        results["errors"] = {}
        bad = index.clone()
        if rank == 1:
            bad[0] = TOTAL + 5
        for name, (feats, idx) in {
            "out_of_range_on_rank1": (reference[index], bad),
            "missing_sample": (reference[index[:-1]], index[:-1]),
            "row_shape_mismatch": (reference[index] if rank == 0 else reference[index].flatten(1), index),
        }.items():
            try:
                all_gather_by_index(feats, idx, TOTAL)
                results["errors"][name] = None
            except ValueError as err:
                results["errors"][name] = str(err)
        results["finite"] = check_finite_on_every_rank(torch.tensor(2.0 + rank), step=7)
        try:  # rank 1's loss diverged: both ranks must stop, not only rank 1 (rank 0 would wait in backward)
            check_finite_on_every_rank(torch.tensor(float("nan") if rank == 1 else 1.5), step=8)
            results["non_finite"] = None
        except NonFiniteLossError as err:
            results["non_finite"] = str(err)
        barrier()
        _train_a_ddp_model_in_a_reference_cycle()
    finally:
        destroy()
        results["threads_after_destroy"] = group_threads()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _train_a_ddp_model_in_a_reference_cycle() -> None:
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()
    model.module.owner = model  # a cycle: only the garbage collector frees it


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gloo")
    context = start_workers(_gloo_worker, (2, free_port(), str(out_dir)))
    wait_for_workers(context, 180, "2-process gloo workers")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.slow  # spawning two interpreters with torch takes ~10-20 s on a busy 2-core machine
def test_two_process_ranks_and_all_reduce(two_process_results):
    for rank, res in enumerate(two_process_results):
        assert (res["rank"], res["world"], res["main"], res["local_rank"]) == (rank, 2, rank == 0, rank)
        assert torch.equal(res["mean"], torch.tensor([1.5, 15.0]))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_gather_by_index_restores_sample_order(two_process_results):
    reference = reference_features()
    for res in two_process_results:
        assert torch.equal(res["gathered"], reference)
        assert torch.equal(res["gathered_2d"], reference.flatten(1))
        assert torch.equal(res["gathered_empty_shard"], reference)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_destroy_ends_the_groups_threads_after_a_ddp_model(two_process_results):
    # A group alive at the interpreter's exit keeps gloo's threads running into it, which now and then aborted a
    # finished rank (SIGABRT, "terminate called without an active exception"). torch._dynamo, which DDP imports,
    # kept such a group alive unless imported before the group was made.
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc/<pid>/task to list a process's threads (Linux)")
    for res in two_process_results:
        assert res["threads_after_destroy"] == []


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_process_results):
    assert [r["finite"] for r in two_process_results] == [2.0, 3.0]  # each rank's own loss
    rank0, rank1 = (r["non_finite"] for r in two_process_results)
    assert rank1 is not None and rank1.startswith("non-finite loss nan at step 8")
    assert rank0 is not None and "this rank's loss=1.5, mean over ranks=nan" in rank0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_broadcast(two_process_results):
    for res in two_process_results:
        assert res["broadcast"] == {"epoch": 3, "ids": [1, 2]}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_gather_errors_reach_every_rank(two_process_results):
    for rank, res in enumerate(two_process_results):
        errors = res["errors"]
        assert "invalid input on rank(s) [1]" in errors["out_of_range_on_rank1"]
        if rank == 1:
            assert "indices must lie in [0, 11)" in errors["out_of_range_on_rank1"]
        assert "2 of 11 samples were not computed" in errors["missing_sample"]
        assert "feature row shapes differ between ranks: [(2, 3), (6,)]" in errors["row_shape_mismatch"]
