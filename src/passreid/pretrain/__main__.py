"""PASS / DINO self-supervised pre-training of a ViT on unlabeled person crops.

The command ``passreid-pretrain``, also ``python pretrain/train.py`` and ``python -m passreid.pretrain``:

    python pretrain/train.py --config-file configs/pretrain/pass_vit_s_lup.yaml \
        --output-dir runs/pass_vit_s --data-root /data/LUPerson/images [--no-resume] [key=value ...]

Multi-process: the same command under ``torchrun --nproc_per_node=8`` or one ``srun`` task per GPU;
see pretrain/README.md. Auto-resumes from ``<output-dir>/checkpoint.pth`` unless ``--no-resume``.
On SIGUSR1/SIGTERM it writes the checkpoint after the current iteration, requeues the SLURM job (when
there is one) and exits 0. ``--print-config`` prints the resolved config and exits; a mistake in the input
is one message and exit status 2 (``--debug`` adds the traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from passreid import dist
from passreid.cli import error_boundary
from passreid.config import default_argument_parser, parse_and_load, print_config
from passreid.engine import requeue_current_job
from passreid.pretrain.config import PretrainConfig, validate_pretrain_config
from passreid.pretrain.trainer import run_pretraining


@error_boundary(program="pretrain/train.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run (or resume) pre-training; exit status 0 when it finished or stopped as asked."""
    parser = default_argument_parser(__doc__.splitlines()[0])
    args, cfg = parse_and_load(PretrainConfig, argv, parser)
    validate_pretrain_config(cfg)  # a config --print-config prints is one the stage accepts (the launchers' check)
    if args.print_config:
        return print_config(cfg)
    try:
        result = run_pretraining(cfg, resume=not args.no_resume)
        is_main = dist.is_main_process()
    finally:
        dist.destroy()
    if is_main:
        if result.preempted:
            requeue_current_job()
        state = ("finished" if result.finished else
                 "stopped by a pre-emption signal" if result.preempted else "stopped (train.max_iters)")
        print(f"pre-training {state} at iteration {result.iteration}; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
