#!/usr/bin/env python
"""finetune/test.py: the command ``passreid-finetune-test`` run from a source checkout (see
``passreid.finetune.testing``)."""
import sys

from passreid.finetune.testing import main

if __name__ == "__main__":
    sys.exit(main())
