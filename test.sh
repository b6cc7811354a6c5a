#!/usr/bin/env bash
# ./test.sh [pytest args]  -- install what the tests need (first use) and run the whole suite.
source "$(dirname "$0")/scripts/venv.sh"
ensure_venv dev
cd "$APEX_ROOT"
# The dashboard test drives Debian's chromium through Playwright (no browser download from a CDN).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing chromium for the dashboard test..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2; } \
      || echo "test.sh: could not install chromium: the dashboard's browser test will be skipped" >&2
  else
    echo "test.sh: /usr/bin/chromium is missing (as root: apt-get install chromium):" \
         "the dashboard's browser test will be skipped" >&2
  fi
fi
# The Slurm test submits a real sbatch job to a one-node cluster on this machine (Debian's slurmctld
# and slurmd); daemons do not outlive a session, so they are (re)started here, as root only.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "${APEX_NO_SLURM:-}" ]; then
  deploy/slurm/single-node-cluster.sh >&2 \
    || echo "test.sh: no single-node Slurm here: the real sbatch test will be skipped" >&2
fi
exec "$VENV/bin/python" -m pytest "$@"
