#!/usr/bin/env python
"""pretrain/train.py: the stage command ``passreid-pretrain`` run from a source checkout (see ``passreid.pretrain.__main__``)."""
import sys

from passreid.pretrain.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
