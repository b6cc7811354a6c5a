#!/bin/bash
# deploy/ec2/bootstrap.sh cpu|cuda -- host setup shared by every instance of deploy/ec2/apex-zmq.yaml.
#
# The stack's user data runs it as root once the source is in /opt/apex-zmq/src (owned by the
# service user `apex`). It installs the project into src/.venv the way ./run.sh does
# (scripts/venv.sh), adds boto3 for host.py, and installs the systemd unit template
# apex-zmq@.service; the user data then adds one drop-in per role with that role's command line.
set -euxo pipefail

torch=${1:?usage: bootstrap.sh cpu|cuda}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
# scripts/venv.sh creates the venv with `python3`, which is 3.9 on Amazon Linux 2023 and too old
# for the project (tomllib): create it with a newer interpreter first, venv.sh then reuses it.
PYTHON=${APEX_PYTHON:-python3.12}
as_apex() { runuser -u apex -- env HOME="$(getent passwd apex | cut -d: -f6)" "$@"; }

[ -x "$SRC/.venv/bin/python" ] || as_apex "$PYTHON" -m venv "$SRC/.venv"
if [ "$torch" = cpu ]; then
  # Actor and evaluator hosts have no GPU: torch's CPU wheel is ~0.2 GB against ~3 GB for the
  # CUDA one and its libraries. Same version as requirements.txt pins (2.x.y+cpu satisfies
  # ==2.x.y), so ensure_venv below sees torch as installed and keeps it.
  pin=$(grep -oE '^torch==[^ #;]+' "$SRC/requirements.txt")
  as_apex "$SRC/.venv/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "$pin"
fi
as_apex bash -c 'source "$1/scripts/venv.sh" && ensure_venv && "$VENV/bin/python" -m pip install -q "boto3>=1.28"' \
  bootstrap "$SRC"

cat > /etc/systemd/system/apex-zmq@.service <<UNIT
# apex-zmq role %i; ExecStart= (the role's full command line) is in apex-zmq@%i.service.d/.
[Unit]
Description=apex-zmq %i
Wants=network-online.target
After=network-online.target

[Service]
User=apex
Group=apex
WorkingDirectory=$SRC
# /var/lib/apex-zmq, owned by apex: the run directory (config, logs, metrics, checkpoints).
StateDirectory=apex-zmq
Environment=PYTHONUNBUFFERED=1
# A crashed role comes back; its peers reconnect on their own (ZeroMQ), as under ./run.sh.
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
