"""Distributed set-up: torchrun / SLURM / single-process resolution, process group, collectives.

Typical use in an entry point::

    env = init_distributed()          # gloo on CPU, NCCL on GPU; no group for one process
    ...
    feats = all_gather_by_index(local_feats, local_indices, len(dataset))
    if is_main_process():
        evaluate(feats)
    destroy()

Fine-tuning on the global batch (:mod:`passreid.dist.batch`): ``gather_batch(output, batch_size)`` and
``convert_sync_batchnorm(model, device)`` make N processes compute the 1-process loss of the same global batch.
"""
from .batch import PortableSyncBatchNorm, all_gather_with_grad, convert_sync_batchnorm, gather_batch
from .comm import (all_gather_by_index, all_reduce_mean, barrier, broadcast_object, destroy,
                   get_local_rank, get_rank, get_world_size, init_distributed, is_main_process)
from .env import (SINGLE_PROCESS_ADDR, SINGLE_PROCESS_PORT, TORCHRUN_VARS, DistEnv,
                  expand_nodelist, resolve_dist_env, slurm_master_port)

__all__ = [
    "DistEnv",
    "PortableSyncBatchNorm",
    "SINGLE_PROCESS_ADDR",
    "SINGLE_PROCESS_PORT",
    "TORCHRUN_VARS",
    "all_gather_by_index",
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "destroy",
    "expand_nodelist",
    "gather_batch",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "resolve_dist_env",
    "slurm_master_port",
]
