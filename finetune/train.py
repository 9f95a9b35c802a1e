#!/usr/bin/env python
"""Supervised re-ID fine-tuning (see finetune/README.md).

    python finetune/train.py --config-file configs/finetune/market1501/pass_vit_s_256.yaml \
        --output-dir runs/market_pass_s --data-root /data model.pretrained=/ckpt/pass_vit_s.pth
    torchrun --nproc_per_node=4 finetune/train.py --config-file ... --output-dir ...

Auto-resumes from <output-dir>/checkpoint.pth unless --no-resume.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from passreid.config import default_argument_parser, parse_and_load
from passreid.finetune import FinetuneConfig, run_training


def main(argv: Sequence[str] | None = None) -> int:
    parser = default_argument_parser(__doc__)
    args, cfg = parse_and_load(FinetuneConfig, argv, parser)
    run_training(cfg, resume=not args.no_resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
