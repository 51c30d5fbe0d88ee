"""`python -m cowbranchd.host`: the same as the `cowbranchd` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
