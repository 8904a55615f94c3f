"""`python -m qatlaw` is the `qatlaw` command (torchrun launches data-parallel runs this way)."""

import sys

from qatlaw.cli import main

sys.exit(main())
