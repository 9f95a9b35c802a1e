"""Supervised re-ID fine-tuning (see finetune/README.md).

The command ``passreid-finetune``, also ``python finetune/train.py`` and ``python -m passreid.finetune``:

    python finetune/train.py --config-file configs/finetune/market1501/pass_vit_s_256.yaml \
        --output-dir runs/market_pass_s --data-root /data model.pretrained=/ckpt/pass_vit_s.pth
    torchrun --nproc_per_node=4 finetune/train.py --config-file ... --output-dir ...

Auto-resumes from <output-dir>/checkpoint.pth unless --no-resume. On SIGUSR1/SIGTERM it writes the
checkpoint after the current iteration, requeues the SLURM job (when there is one) and exits 0.
--print-config prints the resolved config and exits; a mistake in the input is one message and exit
status 2 (--debug adds the traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from passreid.cli import error_boundary, run_training_command
from passreid.finetune import FinetuneConfig, run_training
from passreid.finetune.config import validate_config


@error_boundary(program="finetune/train.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume); on a pre-emption signal write the checkpoint and requeue the SLURM job."""
    return run_training_command(argv, __doc__, FinetuneConfig, run_training, validate_config)


if __name__ == "__main__":
    sys.exit(main())
