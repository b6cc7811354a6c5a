#!/usr/bin/env bash
# ./run.sh [flags]  -- train with every role on this machine (default: ALE/Pong-v5).
# ./run.sh --env CartPole-v1; ./run.sh --help lists every flag. Creates .venv on first use.
source "$(dirname "$0")/scripts/venv.sh"
ensure_venv
exec "$VENV/bin/python" -m apex_zmq.launch "$@"
