"""``python -m replay_server``: the replay_server program (see main.py)."""

import sys

from .main import main

sys.exit(main(sys.argv[1:]))
