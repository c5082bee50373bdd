"""`python -m mdref ...` is the `mdref` command."""

import sys

from mdref.cli import main

if __name__ == "__main__":
    sys.exit(main())
