"""``python -m evaluator``: the evaluator program (see main.py)."""

import sys

from .main import main

sys.exit(main(sys.argv[1:]))
