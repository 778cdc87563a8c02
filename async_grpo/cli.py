"""`async-grpo` command line: `train` (the product) and `generate` (the rollout engine alone).

Each subcommand lives with the code it drives; this module only parses and dispatches, and turns
bad input (ConfigError, UsageError) into one message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from async_grpo.config import ConfigError


class UsageError(ValueError):
    """Bad command-line input (a file, a line of a file, a value): printed as one message, exit 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="async-grpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from async_grpo.workers import generate_cmd

    generate_cmd.add_arguments(sub.add_parser("generate", help="generate completions with the paged engine"))

    from async_grpo import train_cmd

    train_cmd.add_arguments(sub.add_parser("train", help="train a policy with asynchronous GRPO"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, UsageError) as err:
        print(f"async-grpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
