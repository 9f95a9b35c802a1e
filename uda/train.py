#!/usr/bin/env python
"""uda/train.py: the stage command ``passreid-uda`` run from a source checkout (see ``passreid.uda.__main__``)."""
import sys

from passreid.uda.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
