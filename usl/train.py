#!/usr/bin/env python
"""usl/train.py: the stage command ``passreid-usl`` run from a source checkout (see ``passreid.usl.__main__``)."""
import sys

from passreid.usl.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
