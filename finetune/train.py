#!/usr/bin/env python
"""finetune/train.py: the stage command ``passreid-finetune`` run from a source checkout (see ``passreid.finetune.__main__``)."""
import sys

from passreid.finetune.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
