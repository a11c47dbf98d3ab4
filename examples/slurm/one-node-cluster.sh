#!/bin/bash
# A one-node Slurm cluster on this machine, to try examples/slurm/train.sbatch without a real one.
# Needs root and Debian's slurm-wlm (apt-get install -y slurm-wlm, which brings munge and its key).
#
#   examples/slurm/one-node-cluster.sh /tmp/slurm &   # runs until it gets SIGTERM or Ctrl-C
#   export SLURM_CONF=/tmp/slurm/slurm.conf           # then sinfo, sbatch, squeue talk to it
#
# Config, state and logs live in the folder; munge gets a socket of its own in /tmp (so a munged
# that already runs is left alone). Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (6818).
set -euo pipefail
dir=$(realpath -m "${1:?usage: one-node-cluster.sh FOLDER}")
mkdir -p "$dir"/state "$dir"/spool "$dir"/log
# munged runs as the munge user, which must reach its folder (a test's private tmp folder will not do).
munge_dir=$(mktemp -d /tmp/stages-munge.XXXXXX)
chmod 755 "$munge_dir"
chown munge:munge "$munge_dir"
node=$(hostname -s)
memory_mb=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 2048 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait; rm -rf "$munge_dir"; }
trap stop EXIT
trap 'exit 0' INT TERM
# setpriv execs munged as the munge user (no process in between), so its pid is the daemon's.
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
  --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
  --seed-file="$munge_dir/munged.seed" --log-file="$munge_dir/munged.log" &
pids+=($!)
slurmctld -D >"$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D >"$dir/log/slurmd.out" 2>&1 &
pids+=($!)
while ((SECONDS < 60)); do
  if sinfo -h -N -o %T 2>/dev/null | grep -qx idle; then
    echo "slurm is up: export SLURM_CONF=$SLURM_CONF"
    wait
  fi
  sleep 0.5
done
echo "slurm did not come up; see $dir/log" >&2
exit 1
