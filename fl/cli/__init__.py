"""The ``bonsai`` command: one subcommand per module, user errors as one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from fl.cli import deploy, export, keys, report, run, sweep, validate

SUBCOMMANDS = {"run": run, "validate": validate, "keys": keys, "sweep": sweep,
               "report": report}
SUBCOMMANDS |= {"deploy": deploy, "export": export}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bonsai", description="Bonsai: federated learning on Flower (AutoFLIP, FedLD)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMANDS.values():
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
