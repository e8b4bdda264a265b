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

# Compute daemon first, then controller, then munge (both need it to shut down cleanly).
stop "$run/slurmd.pid"
stop "$run/slurmctld.pid"
stop "$run/munge/munged.pid"
echo "stop_cluster.sh: stopped the cluster in $run"
