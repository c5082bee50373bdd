"""The `mdref` command: a thin shell over the pipeline."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser():
    parser = argparse.ArgumentParser(prog="mdref", description="mdref: a NumPy golden reference for one-step "
                                     "text-to-image diffusion in the MobileDiffusion family.")
    parser.add_argument("--version", action="version", version=f"mdref {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
