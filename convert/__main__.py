"""``python -m convert SRC DST [--dtype ...] [--verify] ...`` is ``aria-jax convert SRC DST ...``."""

import sys

from aria_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
