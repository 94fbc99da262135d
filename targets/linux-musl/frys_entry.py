"""Entry point of the frozen `frys` binary: the same `main` as the `frys` console script."""

import sys

from frys_edge.cli import main

if __name__ == "__main__":
    sys.exit(main())
