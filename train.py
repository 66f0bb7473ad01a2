#!/usr/bin/env python
"""Entry point: `python train.py` runs the demo; see `python train.py --help`."""
import sys

from ldae_fast.train import main

if __name__ == "__main__":
    sys.exit(main())
