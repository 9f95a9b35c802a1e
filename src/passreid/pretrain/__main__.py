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

from passreid.cli import error_boundary, run_training_command
from passreid.pretrain.config import PretrainConfig, validate_pretrain_config
from passreid.pretrain.trainer import PretrainResult, run_pretraining


def report_outcome(result: PretrainResult) -> None:
    """One line on how the run ended and where its outputs are."""
    state = ("finished" if result.finished else
             "stopped by a pre-emption signal" if result.preempted else "stopped (train.max_iters)")
    print(f"pre-training {state} at iteration {result.iteration}; outputs in {result.output_dir}")


@error_boundary(program="pretrain/train.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume); on a pre-emption signal write the checkpoint and requeue the SLURM job."""
    return run_training_command(argv, __doc__, PretrainConfig, run_pretraining, validate_pretrain_config,
                                report=report_outcome)


if __name__ == "__main__":
    sys.exit(main())
