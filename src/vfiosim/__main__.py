"""``python -m vfiosim``: the ``vfiosim`` command."""

import sys

from .cli import main

sys.exit(main())
