"""``python -m vtoken.demo`` is ``vtoken demo``."""

import sys

from vtoken.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
