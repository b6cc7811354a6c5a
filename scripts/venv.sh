# Sourced by run.sh and test.sh: create .venv on first use and install what the project needs.
# Re-installs when requirements*.txt or pyproject.toml change (their hash is kept in the venv).
set -euo pipefail
APEX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$APEX_ROOT/.venv"
ensure_venv() {
  local want_dev="${1:-}" stamp hash files=("$APEX_ROOT/requirements.txt" "$APEX_ROOT/pyproject.toml"
                                            "$APEX_ROOT/requirements-minatar.txt")
  [ -n "$want_dev" ] && files+=("$APEX_ROOT/requirements-dev.txt")
  hash="$(cat "${files[@]}" | sha256sum | cut -c1-16)"
  stamp="$VENV/.apex-installed-${hash}"
  [ -f "$stamp" ] && return 0
  # The test install is a superset of the run install: ./run.sh after ./test.sh installs nothing more.
  if [ -z "$want_dev" ]; then
    local dev_hash
    dev_hash="$(cat "${files[@]}" "$APEX_ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)"
    [ -f "$VENV/.apex-installed-${dev_hash}" ] && return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setting up $VENV (first run; torch and the Atari ROMs take a few minutes)..." >&2
    python3 -m venv "$VENV"
  fi
  echo "[1/3] upgrading pip" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # Not -q: pip's own lines and progress bars show what is being fetched (torch is the long one).
  echo "[2/3] installing requirements${want_dev:+ and test requirements}" >&2
  "$VENV/bin/python" -m pip install --progress-bar on -r "$APEX_ROOT/requirements.txt" \
    ${want_dev:+-r "$APEX_ROOT/requirements-dev.txt"} >&2
  if [ -z "${APEX_NO_MINATAR:-}" ]; then
    # GPL-3.0 and optional: without its plotting dependencies (see requirements-minatar.txt).
    "$VENV/bin/python" -m pip install -q --no-deps -r "$APEX_ROOT/requirements-minatar.txt" >&2
  fi
  echo "[3/3] installing apex-zmq itself" >&2
  "$VENV/bin/python" -m pip install -q --no-deps -e "$APEX_ROOT" >&2
  touch "$stamp"
}
