#!/usr/bin/env bash
# Start a single-node SLURM cluster (munged, slurmctld, slurmd) for tests.
#
#   bash tests/slurm/start_cluster.sh [RUN_DIR]     # default: .slurm-test in the repository
#
# Everything (config, munge key and socket, state, logs, pid files) lives in RUN_DIR. The one
# change outside it: /etc/slurm/slurm.conf becomes a symlink to RUN_DIR/slurm.conf, because the
# executor plugin's job step drops SLURM_CONF before calling srun, so srun inside a job only
# finds the standard path. An existing real configuration there is never replaced.
# Needs root (the daemons run as root) and tests/slurm/install.sh.
# Stop it with tests/slurm/stop_cluster.sh RUN_DIR.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
run="$(realpath -m "${1:-$here/../../.slurm-test}")"
ctld_port="${SLURMCTLD_PORT:-6817}"
slurmd_port="${SLURMD_PORT:-6818}"

for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "start_cluster.sh: $cmd not found; run tests/slurm/install.sh" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "start_cluster.sh: must run as root" >&2; exit 2; }

# A test cluster left running (this run folder's, or the one the standard path names) would
# hold the ports.
bash "$here/stop_cluster.sh" "$run" >/dev/null 2>&1 || true
if [ -L /etc/slurm/slurm.conf ] && grep -qs '^ClusterName=sparsitytrap-test$' /etc/slurm/slurm.conf; then
    bash "$here/stop_cluster.sh" "$(dirname "$(readlink /etc/slurm/slurm.conf)")" >/dev/null 2>&1 || true
fi
mkdir -p "$run"/{state,spool,log,munge}
chmod 711 "$run/munge"

# Config: the node line comes from this machine's hardware.
node="$(slurmd -C | head -n 1)"
host="$(hostname -s)"
sed -e "s|@RUN@|$run|g" -e "s|@HOST@|$host|g" -e "s|@NODE@|$node|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    "$here/slurm.conf.in" > "$run/slurm.conf"
cp "$here/gres.conf.in" "$run/gres.conf"   # slurmd reads gres.conf beside slurm.conf
export SLURM_CONF="$run/slurm.conf"

# The standard path: ours if absent or left by an earlier test cluster (a dangling symlink or
# one to a config of this test cluster); anything else is a real installation.
etc_conf=/etc/slurm/slurm.conf
if [ -e "$etc_conf" ] || [ -L "$etc_conf" ]; then
    if ! [ -L "$etc_conf" ] || { [ -e "$etc_conf" ] && ! grep -q '^ClusterName=sparsitytrap-test$' "$etc_conf"; }; then
        echo "start_cluster.sh: $etc_conf is a real SLURM configuration; not replacing it" >&2
        exit 3
    fi
fi
mkdir -p /etc/slurm
ln -sfn "$run/slurm.conf" "$etc_conf"

# munge: a private key and socket for this cluster only.
if [ ! -s "$run/munge/munge.key" ]; then
    dd if=/dev/urandom of="$run/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$run/munge/munge.key"
fi
# Daemons detach, but must not keep the caller's output pipe open (a test runner would wait on
# it): their stdio goes to the run folder. Pid files are named in slurm.conf.
munged --force --socket="$run/munge/munge.socket" --key-file="$run/munge/munge.key" \
    --pid-file="$run/munge/munged.pid" --log-file="$run/log/munged.log" \
    --seed-file="$run/munge/munged.seed" </dev/null >"$run/log/munged.out" 2>&1
slurmctld </dev/null >"$run/log/slurmctld.out" 2>&1
slurmd </dev/null >"$run/log/slurmd.out" 2>&1

# Ready when the node is idle (a few seconds).
for _ in $(seq 60); do
    for daemon in slurmctld slurmd; do
        if [ -s "$run/$daemon.pid" ] && ! kill -0 "$(cat "$run/$daemon.pid")" 2>/dev/null; then
            echo "start_cluster.sh: $daemon did not start; its log:" >&2
            tail -n 5 "$run/log/$daemon.log" >&2
            exit 1
        fi
    done
    state="$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)"
    if [ "$state" = "idle" ]; then
        echo "start_cluster.sh: cluster up ($etc_conf -> $SLURM_CONF)"
        exit 0
    fi
    sleep 0.5
done
echo "start_cluster.sh: node not idle after 30 s (state '$state'); logs in $run/log" >&2
tail -n 20 "$run/log/slurmctld.log" "$run/log/slurmd.log" >&2 || true
exit 1
