"""`python -m ldae_fast COMMAND ...`: the `ldae-fast` command (ldae_fast/cli.py)."""

import sys

from .cli import main

sys.exit(main())
