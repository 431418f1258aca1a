"""The ``cstep`` command line.

Each subcommand lives in a function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`. Errors a user can fix (bad names, bad values, missing files) are raised as
:class:`UsageError` (or ``ValueError`` from the library) and printed as one line on stderr with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cstep",
        description="cstep: complex-step curvature and second-order neural-network training "
                    "(K-BFGS, K-BFGS(L), Newton-Krylov, K-FAC, Hessian-free, Adam, RMSprop, SGD) on NumPy or CuPy.",
    )
    parser.add_argument("--version", action="version", version=f"cstep {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
