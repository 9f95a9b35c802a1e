"""Cluster-Contrast domain adaptation (UDA) from a source-trained fine-tuned model (see uda/README.md).

The command ``passreid-uda``, also ``python uda/train.py`` and ``python -m passreid.uda``:

    python uda/train.py --config-file configs/uda/msmt2market_pass_vit_s.yaml --output-dir runs/uda_msmt2market \
        --data-root /data model.init_from=runs/msmt17_pass_s/model_final.pth
    torchrun --nproc_per_node=4 uda/train.py --config-file ... --output-dir ...

The same loop as usl/train.py on the target domain only, started from model.init_from (its BN necks and
classifier are dropped and reported). Auto-resumes from <output-dir>/checkpoint.pth unless --no-resume; on
SIGUSR1/SIGTERM it writes the checkpoint, requeues the SLURM job (when there is one) and exits 0.
--print-config prints the resolved config and exits; a mistake in the input is one message and exit
status 2 (--debug adds the traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from passreid.cli import error_boundary, run_training_command
from passreid.uda import run_uda, validate_uda_config
from passreid.usl import UslConfig


@error_boundary(program="uda/train.py")
def main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume); on a pre-emption signal write the checkpoint and requeue the SLURM job."""
    return run_training_command(argv, __doc__, UslConfig, run_uda, validate_uda_config)


if __name__ == "__main__":
    sys.exit(main())
