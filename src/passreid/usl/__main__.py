"""Cluster-Contrast unsupervised re-ID (USL) from a PASS pre-trained backbone (see usl/README.md).

The command ``passreid-usl``, also ``python usl/train.py`` and ``python -m passreid.usl``:

    python usl/train.py --config-file configs/usl/market_pass_vit_s.yaml --output-dir runs/usl_market \
        --data-root /data model.pretrained=/ckpt/pass_vit_small_full.pth
    torchrun --nproc_per_node=4 usl/train.py --config-file ... --output-dir ...

Auto-resumes from <output-dir>/checkpoint.pth unless --no-resume. On SIGUSR1/SIGTERM it writes the
checkpoint after the current iteration, requeues the SLURM job (when there is one) and exits 0.
--print-config prints the resolved config and exits; a mistake in the input is one message and exit
status 2 (--debug adds the traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from passreid.cli import error_boundary, run_training_command
from passreid.usl import UslConfig, run_usl
from passreid.usl.config import validate_usl_config


@error_boundary(program="usl/train.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume); on a pre-emption signal write the checkpoint and requeue the SLURM job."""
    return run_training_command(argv, __doc__, UslConfig, run_usl, validate_usl_config)


if __name__ == "__main__":
    sys.exit(main())
