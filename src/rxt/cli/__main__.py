"""`python -m rxt.cli`: the same as the `rxt` command."""

import sys

from rxt.cli import main

sys.exit(main())
