"""The ``bonsai`` command: one subcommand per module, user errors as one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module with ``add_parser(sub)``; a module is imported only when needed
SUBCOMMANDS = ("run", "validate", "keys", "sweep", "report", "deploy", "export", "init")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand.

    Only the named subcommand's module is imported (all of them for ``--help`` or
    an unknown name): ``bonsai run`` lives as long as its run and so stays small
    (no torch in it; the deploy and export modules need it).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="bonsai", description="Bonsai: federated learning on Flower (AutoFLIP, FedLD)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    names = [argv[0]] if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS
    for name in names:
        importlib.import_module(f"fl.cli.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
