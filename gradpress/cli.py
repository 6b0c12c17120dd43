"""The ``gradpress`` command line.

Each subcommand is a module in :mod:`gradpress.commands` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; modules are discovered, so adding a
command is adding a file. Heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import gradpress
import gradpress.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradpress",
        description="Gradient compression with real bit streams: bounds, benchmarks, "
                    "simulations, DDP training and federated learning.",
    )
    parser.add_argument("--version", action="version", version=gradpress.__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(gradpress.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"gradpress.commands.{info.name}")
        p = sub.add_parser(info.name, help=mod.HELP, description=(mod.__doc__ or mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # results name their command
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
