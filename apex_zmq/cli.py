"""``apex-zmq <command>``: one entry point for every program."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("apex_zmq.launch", "all roles on this machine, supervised (what ./run.sh runs)"),
    "actor": ("actor.main", "one actor process"),
    "replay_server": ("replay_server.main", "the replay server"),
    "learner": ("learner.main", "the learner"),
    "evaluator": ("evaluator.main", "the evaluator"),
    "relay": ("apex_zmq.relay", "per-host weights relay: one learner subscription for all of a host's actors"),
    "play": ("evaluator.play", "evaluate a checkpoint over N seeded episodes (stats, CSV, video)"),
    "keys": ("apex_zmq.keys", "create the CURVE keys of a deployment (then pass --keys DIR to every role)"),
    "bounds": ("apex_zmq.flow", "what may be in flight between the roles of a run (bytes, messages, priorities' lag)"),
}
ALIASES = {"replay": "replay_server", "replay-server": "replay_server"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a program's ``main``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: apex-zmq COMMAND [flags]\n\ncommands:")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:14s} {what}")
        return 0 if argv else 2
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"apex-zmq: unknown command {argv[0]!r}; expected one of {list(COMMANDS)}", file=sys.stderr)
        return 2
    result = importlib.import_module(COMMANDS[name][0]).main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
