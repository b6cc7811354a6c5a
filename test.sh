#!/usr/bin/env bash
# ./test.sh [pytest args]  -- install what the tests need (first use) and run the whole suite.
source "$(dirname "$0")/scripts/venv.sh"
ensure_venv dev
cd "$APEX_ROOT"
exec "$VENV/bin/python" -m pytest "$@"
