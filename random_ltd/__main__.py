"""``python -m random_ltd plan|info`` (see random_ltd/cli.py)."""

import sys

from random_ltd.cli import main

sys.exit(main())
