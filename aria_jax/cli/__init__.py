"""The ``aria-jax`` command line. Bad input exits with status 2 and one line naming the file, key or value."""

from __future__ import annotations

import argparse
import sys

from aria_jax import compile_cache
from aria_jax.cli import checkpoints, demo, plan, serve
from aria_jax.cli import generate as cli_generate
from aria_jax.cli.verify import VerifyError
from aria_jax.errors import one_line, os_error_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-jax", description="Aria (rhymes-ai/Aria) in JAX/Flax.")
    parser.add_argument(compile_cache.FLAG, action="store_true",
                        help="do not read or write the persistent compilation cache (default: on, in "
                             "$XDG_CACHE_HOME/aria-jax/xla or ~/.cache/aria-jax/xla, or $JAX_COMPILATION_CACHE_DIR; "
                             f"also off with {compile_cache.OFF_ENV}=1); accepted anywhere on the line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkpoints.add_parsers(sub)
    cli_generate.add_parsers(sub)
    demo.add_parser(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, no_cache = compile_cache.strip_flag(argv)
    args = build_parser().parse_args(rest)
    args.argv = argv  # `aria-jax plan` re-runs itself in a fresh process when JAX already started with too few devices
    compile_cache.enable(off=no_cache)
    try:
        return args.func(args)
    except ValueError as e:  # InputError (every bad file, key or value) and the argument checks
        return fail(args.command, one_line(e))
    except OSError as e:  # the file system: a missing or unreadable input, a read-only or full destination, ...
        return fail(args.command, os_error_line(e))
    except VerifyError as e:
        print(f"aria-jax {args.command}: verify failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def fail(command: str, line: str) -> int:
    """Bad input: one line on stderr, exit status 2."""
    print(f"aria-jax {command}: error: {line}", file=sys.stderr)
    return 2
