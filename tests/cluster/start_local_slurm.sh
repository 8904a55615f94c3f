#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine (munge + slurmctld + slurmd, no accounting), for
# tests/test_cluster.py and for trying `snakemake --profile profiles/slurm` without a real cluster.
#
#   sudo tests/cluster/start_local_slurm.sh   # idempotent: exits 0 at once if SLURM is already up
#   sinfo; snakemake --profile profiles/slurm ...
#   sudo tests/cluster/stop_local_slurm.sh    # stops only the daemons this script started
#
# The config goes to /etc/slurm/slurm.conf, where every SLURM command looks (the executor plugin's srun
# inside each job drops SLURM_CONF from its environment, so a config elsewhere would not be found); a
# slurm.conf this script did not write is never overwritten. State, logs and `pids` (one "PID NAME" line
# per daemon this script started) live under $QATLAW_SLURM_DIR (default /tmp/qatlaw-slurm). Installs
# slurmctld, slurmd, slurm-client and munge with apt-get when they are missing. Exit status: 0 up; 1 it did
# not come up (the daemons' logs are printed); 2 not root; 3 packages missing and no apt-get; 4 a foreign
# /etc/slurm/slurm.conf is in the way.
set -euo pipefail

DIR=${QATLAW_SLURM_DIR:-/tmp/qatlaw-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# Written by tests/cluster/start_local_slurm.sh"
NODE=$(hostname -s)
WAIT_S=${QATLAW_SLURM_WAIT_S:-60}

say() { echo "start_local_slurm: $*"; }
die() { local code=$1; shift; echo "start_local_slurm: error: $*" >&2; exit "$code"; }

node_state() { sinfo --noheader --nodes "$NODE" --format %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }
node_ready() { case "$(node_state)" in idle | mix | alloc) return 0 ;; *) return 1 ;; esac; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
launch() {  # launch NAME PIDFILE COMMAND...: start a daemon, wait for its pid file, record "PID NAME" in pids
    local name=$1 pidfile=$2 pid="" i
    shift 2
    rm -f "$pidfile"
    # Its own stdio goes to a file, never to our caller's pipes (which would then stay open).
    "$@" </dev/null >"$DIR/log/$name.out" 2>&1 || true
    for ((i = 0; i < 50; i++)); do  # it daemonizes, then writes its pid file
        pid=$(cat "$pidfile" 2>/dev/null || true)
        alive "$pid" && break
        sleep 0.2
    done
    if ! alive "$pid"; then
        tail -n 20 "$DIR/log/$name.out" "$DIR/log/$name.log" >&2 2>/dev/null || true
        die 1 "$name did not come up (no live PID in $pidfile; output above, logs in $DIR/log)"
    fi
    echo "$pid $name" >>"$DIR/pids"
    say "started $name (pid $pid)"
}

if [[ -f $CONF ]] && scontrol ping >/dev/null 2>&1 && node_ready; then
    say "already up (node $NODE $(node_state), $CONF)"
    exit 0
fi
unset SLURM_CONF  # from here on, the config this script writes

[[ $(id -u) -eq 0 ]] || die 2 "must run as root: it installs packages and starts munged, slurmctld and slurmd"

missing=()
for cmd in munged slurmctld slurmd sbatch squeue; do
    command -v "$cmd" >/dev/null || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die 3 "missing ${missing[*]} and no apt-get to install slurmctld slurmd slurm-client munge"
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
export PATH=$PATH:/usr/sbin

if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    die 4 "$CONF exists but was not written by this script, and that SLURM is not up; not overwriting it"
fi
mkdir -p "$DIR/state/slurmctld" "$DIR/state/slurmd" "$DIR/log" /etc/slurm
# srun and slurmstepd look this host up by name.
if ! getent hosts "$NODE" >/dev/null; then
    echo "127.0.0.1 $NODE" >>/etc/hosts
    say "added '127.0.0.1 $NODE' to /etc/hosts (the host name did not resolve)"
fi

# munge: reuse a running munged (the default socket); otherwise start one with the packaged key.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    launch munged /run/munge/munged.pid runuser -u munge -- munged
    munge -n | unmunge >/dev/null || die 1 "munged is running but a credential does not round-trip"
fi

# The node as slurmd sees it (CPUs, sockets, cores, RealMemory), listening on the loopback address.
hardware=$(slurmd -C | head -n1)
[[ $hardware == NodeName=* ]] || die 1 "unexpected 'slurmd -C' output: $hardware"
hardware=${hardware#NodeName=* }
cat >"$CONF.tmp" <<EOC
$MARK
# One node, no accounting database; state and logs under $DIR.
ClusterName=qatlaw-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups: processes are tracked by parent PID, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: sacct has nothing to read, so job status comes from squeue, which shows a finished job
# for MinJobAge seconds (the SLURM executor requires at least 3 x its first status-check delay).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOC
mv "$CONF.tmp" "$CONF"

if scontrol ping >/dev/null 2>&1; then
    say "slurmctld already running"
else
    launch slurmctld "$DIR/slurmctld.pid" slurmctld -f "$CONF"
fi
if alive "$(cat "$DIR/slurmd.pid" 2>/dev/null || true)"; then
    say "slurmd already running"
else
    launch slurmd "$DIR/slurmd.pid" slurmd -f "$CONF" -N "$NODE"
fi

for ((i = 0; i < WAIT_S; i++)); do
    node_ready && break
    case "$(node_state)" in down | drain | drng | fail) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;; esac
    sleep 1
done
if ! node_ready; then
    echo "start_local_slurm: error: node $NODE is '$(node_state)' after ${WAIT_S}s, not idle" >&2
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
fi
say "up: node $NODE $(node_state) ($CONF, logs in $DIR/log)"
