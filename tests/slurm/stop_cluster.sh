#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh: kill the daemons named by its pid files.
#   bash tests/slurm/stop_cluster.sh [RUN_DIR]
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
run="$(realpath -m "${1:-$here/../../.slurm-test}")"

stop() {  # stop PIDFILE: TERM, wait up to 10 s, then KILL
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

# Cancel what is still queued or running on this cluster (its jobs outlive slurmd otherwise).
if [ -s "$run/slurmctld.pid" ] && kill -0 "$(cat "$run/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF="$run/slurm.conf" timeout 10 scancel --user="$(id -un)" 2>/dev/null
    sleep 1
fi
# Compute daemon first, then controller, then munge (both need it to shut down cleanly).
stop "$run/slurmd.pid"
stop "$run/slurmctld.pid"
stop "$run/munge/munged.pid"
# The symlink start_cluster.sh made at the standard path, if it is still ours.
if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$run/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
fi
echo "stop_cluster.sh: stopped the cluster in $run"
