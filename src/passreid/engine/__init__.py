"""Training-loop building blocks shared by every stage (pretrain, finetune, usl, uda).

:class:`passreid.engine.trainer.Trainer` is the one training loop of every stage (set-up, per-iteration
schedules, checkpoint and evaluation periods, pre-emption, exact resume); import it from
:mod:`passreid.engine.trainer` (it is not re-exported here, which keeps ``passreid.data`` -> ``passreid.engine``
imports free of cycles). It composes the pieces below; a loop of one's own would use them
like this::

    out = make_output_dir(args.output_dir)
    logger = setup_logging(out, rank=env.rank)
    ckpt = Checkpointer(out, is_main=env.rank == 0)
    seed_everything(cfg.seed + env.rank)
    lr_schedule = cosine_schedule(lr, min_lr, total_iters, warmup_iters)   # indexed by iteration
    amp = autocast_for(device, cfg.precision)
    start = ResumeInfo(epoch=0, iteration=0)
    if not args.no_resume and (state := ckpt.load()) is not None:
        start = restore_checkpoint(state, model=model, optimizer=opt, scaler=amp.scaler,
                                   rank=env.rank, world_size=env.world_size)
        # put the sampler at start.sampler (or pass sampler=... above)
    metrics = MetricsWriter(out, enabled=env.rank == 0, purge_step=start.iteration + 1)
    progress = ProgressLogger(total_iters, log_period=20, logger=logger)
    for it in range(start.iteration, total_iters):
        apply_schedule(opt, lr=lr_schedule[it])
        with amp.autocast():
            loss = model(batch)
        check_finite(loss, it)          # raises NonFiniteLossError; let it propagate
        ...backward / step...
        progress.update(it, loss=loss)
        ckpt.save(build_checkpoint(model=model, optimizer=opt, scaler=amp.scaler,
                                   epoch=epoch, iteration=it + 1, sampler=position,
                                   config=config_to_dict(cfg)))

Checkpoint dict convention: see :mod:`passreid.engine.checkpoint` (keys ``model, optimizer,
scheduler, scaler, epoch, iteration, rng, sampler, config, extra``).

Exact resume covers model, optimizer, scheduler, scaler, the global RNGs and the sampler
position. Two conditions are on the stage: build the DataLoader with its own
``generator`` (seeded per epoch), because creating an iterator draws the workers' base
seed from it, or from the global torch RNG otherwise; and seed each sample's random
augmentation from its place in the epoch (``passreid.data.samplers.SampleSeeds`` /
``SeededSamples``), or a mid-epoch resume with ``num_workers > 0`` restarts the workers'
streams elsewhere. Build every loader a stage iterates as a :class:`PreemptibleDataLoader`
(pre-emption signals reach the workers too; see :mod:`passreid.engine.preemption`).
"""
from passreid.engine.amp import (PRECISIONS, AmpSetup, RunPrecision, autocast_for, describe_precision,
                                 resolve_precision, run_precision)
from passreid.engine.checkpoint import (
    CHECKPOINT_KEYS,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointStateError,
    ResumeInfo,
    atomic_save,
    build_checkpoint,
    remove_stale_temp_files,
    restore_checkpoint,
    unwrap_model,
)
from passreid.engine.device import select_device
from passreid.engine.guards import NonFiniteLossError, check_finite, check_finite_on_every_rank
from passreid.engine.logger import (MetricsWriter, ProgressLogger, SmoothedValue, ThroughputLogger, format_eta,
                                   setup_logging)
from passreid.engine.output import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FINAL_MODEL_FILE,
    LOG_FILE,
    METRICS_FILE,
    SCHEDULES_FILE,
    TENSORBOARD_DIR,
    OutputLayout,
    make_output_dir,
    output_layout,
)
from passreid.engine.preemption import (
    PREEMPTION_SIGNALS,
    PreemptibleDataLoader,
    PreemptionGuard,
    batches_until_preempted,
    preemption_guard,
    requeue_current_job,
)
from passreid.engine.schedules import (apply_schedule, cosine_schedule, save_schedules, warmup_cosine_lr,
                                       warmup_multistep_lr, warmup_step_lr)
from passreid.seeding import (
    capture_rng_state,
    derive_seed,
    gather_rng_states,
    restore_rng_state,
    seed_everything,
    seeded_global_rngs,
    worker_init_fn,
)

__all__ = [
    "AmpSetup",
    "CHECKPOINT_FILE",
    "CHECKPOINT_KEYS",
    "CONFIG_FILE",
    "CheckpointCorruptError",
    "CheckpointStateError",
    "Checkpointer",
    "FINAL_MODEL_FILE",
    "LOG_FILE",
    "METRICS_FILE",
    "SCHEDULES_FILE",
    "MetricsWriter",
    "NonFiniteLossError",
    "OutputLayout",
    "PRECISIONS",
    "PREEMPTION_SIGNALS",
    "PreemptibleDataLoader",
    "PreemptionGuard",
    "ProgressLogger",
    "ResumeInfo",
    "RunPrecision",
    "SmoothedValue",
    "TENSORBOARD_DIR",
    "ThroughputLogger",
    "apply_schedule",
    "atomic_save",
    "autocast_for",
    "batches_until_preempted",
    "build_checkpoint",
    "capture_rng_state",
    "check_finite",
    "check_finite_on_every_rank",
    "cosine_schedule",
    "derive_seed",
    "describe_precision",
    "format_eta",
    "gather_rng_states",
    "make_output_dir",
    "output_layout",
    "preemption_guard",
    "remove_stale_temp_files",
    "requeue_current_job",
    "resolve_precision",
    "run_precision",
    "restore_checkpoint",
    "restore_rng_state",
    "save_schedules",
    "seed_everything",
    "select_device",
    "seeded_global_rngs",
    "setup_logging",
    "unwrap_model",
    "warmup_cosine_lr",
    "warmup_multistep_lr",
    "warmup_step_lr",
    "worker_init_fn",
]
