"""`python -m dino3.cli ...` runs the `dino3` command."""

import sys

from . import main

sys.exit(main())
