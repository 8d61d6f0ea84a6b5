"""`python -m histosynth ...`: the `histosynth` command (clients/cli.py), from a wheel or a checkout."""

from __future__ import annotations

import sys

from histosynth.clients.cli import main

if __name__ == "__main__":
    sys.exit(main())
