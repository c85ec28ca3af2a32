"""``python -m shmstore``: the ``shmstore`` command; see ``shmstore/_cli.py``."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
