#!/usr/bin/env bash
# Stop daemons that tests/cluster/start_local_slurm.sh started, by the PIDs it recorded in
# $QATLAW_SLURM_DIR/pids (default /tmp/qatlaw-slurm/pids); nothing else is touched.
#   stop_local_slurm.sh            every daemon recorded there
#   stop_local_slurm.sh PID...     only these (each must be recorded there), as tests/test_cluster.py does
# Removes the /etc/slurm/slurm.conf the start script wrote once the slurmctld it started is stopped.
set -euo pipefail

DIR=${QATLAW_SLURM_DIR:-/tmp/qatlaw-slurm}
PIDS=$DIR/pids
MARK="# Written by tests/cluster/start_local_slurm.sh"
[[ -f $PIDS ]] || { echo "stop_local_slurm: no daemons recorded in $PIDS"; exit 0; }

if (($#)); then
    for pid in "$@"; do
        grep -q "^$pid " "$PIDS" || { echo "stop_local_slurm: error: pid $pid is not recorded in $PIDS" >&2; exit 1; }
    done
    wanted=" $* "
else
    wanted=""
fi

stopped_ctld=false
keep=()
# Reverse start order: slurmd, slurmctld, then munged.
while read -r pid name; do
    if [[ -n $wanted && $wanted != *" $pid "* ]]; then
        keep+=("$pid $name")
        continue
    fi
    # Only a live process that is still the daemon we started (PIDs get reused).
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$name"* ]]; then
        echo "stop_local_slurm: $name (pid $pid) is no longer running"
    else
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop_local_slurm: $name (pid $pid) still running 10 s after SIGTERM, sending SIGKILL"
            kill -KILL "$pid"
        fi
        echo "stop_local_slurm: stopped $name (pid $pid)"
    fi
    [[ $name == slurmctld ]] && stopped_ctld=true
done < <(tac "$PIDS")

if ((${#keep[@]})); then printf '%s\n' "${keep[@]}" | tac >"$PIDS"; else rm -f "$PIDS"; fi
if $stopped_ctld && grep -qxF "$MARK" /etc/slurm/slurm.conf 2>/dev/null; then
    rm -f /etc/slurm/slurm.conf
fi
