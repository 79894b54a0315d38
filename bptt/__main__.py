"""``python -m bptt``: the command line (see :mod:`bptt.cli`)."""

import sys

from bptt.cli import main

sys.exit(main())
