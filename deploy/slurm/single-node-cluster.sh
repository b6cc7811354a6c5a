#!/bin/bash
# deploy/slurm/single-node-cluster.sh -- a throw-away one-node Slurm cluster on this Debian/Ubuntu
# machine (munge + slurmctld + slurmd from apt), so that tests/test_deploy.py can submit a real
# `sbatch` of deploy/slurm/apex-zmq.sbatch. For a test box or CI image only: run as root.
#
# It refuses to touch a machine that already has /etc/slurm/slurm.conf (a real cluster's config is
# not ours to overwrite), and starts the daemons directly rather than through systemd because test
# containers usually have no init system. `single-node-cluster.sh stop` ends the daemons it started.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by apex-zmq deploy/slurm/single-node-cluster.sh"
PIDS=/run/apex-zmq-slurm

if [ "${1:-}" = stop ]; then
  for name in slurmd slurmctld munged; do
    [ -f "$PIDS/$name.pid" ] && kill "$(cat "$PIDS/$name.pid")" 2>/dev/null || true
  done
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "single-node-cluster.sh: run as root" >&2; exit 1; }
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  echo "single-node-cluster.sh: $CONF exists and is not ours; leaving this machine alone" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge
fi

node=$(hostname -s)
# slurmd -C reports this machine's real CPUs and memory; declaring more than exists drains the node.
cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$PIDS"
cat > "$CONF" <<EOF
$MARK
ClusterName=apex-test
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
# No cgroup hierarchy is guaranteed in a container: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

# munge refuses to start with a key readable by others; Debian's package creates a good one.
[ -s /etc/munge/munge.key ] || mungekey --create
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged --pid-file=/run/munge/munged.pid
cp /run/munge/munged.pid "$PIDS/munged.pid" 2>/dev/null || true
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "single-node-cluster.sh: node $node is up ($(sinfo -h -o '%P %T %c'))"
    exit 0
  fi
  scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "single-node-cluster.sh: the node did not come up; see /var/log/slurm/" >&2
exit 1
