#!/usr/bin/env bash
# Start a single-node SLURM cluster (munged, slurmctld, slurmd) for tests.
#
#   bash tests/slurm/start_cluster.sh [RUN_DIR]     # default: .slurm-test in the repository
#   export SLURM_CONF=RUN_DIR/slurm.conf            # then sbatch/squeue/snakemake use it
#
# Everything (config, munge key and socket, state, logs, pid files) lives in RUN_DIR; nothing
# under /etc is changed. Needs root (the daemons run as root) and tests/slurm/install.sh.
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

# A cluster left running from an earlier run would hold the ports.
bash "$here/stop_cluster.sh" "$run" >/dev/null 2>&1 || true
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

# munge: a private key and socket for this cluster only.
if [ ! -s "$run/munge/munge.key" ]; then
    dd if=/dev/urandom of="$run/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$run/munge/munge.key"
fi
munged --force --socket="$run/munge/munge.socket" --key-file="$run/munge/munge.key" \
    --pid-file="$run/munge/munged.pid" --log-file="$run/log/munged.log" \
    --seed-file="$run/munge/munged.seed"

# Daemons detach; their pid files are named in slurm.conf (stop_cluster.sh reads them).
slurmctld
slurmd

# Ready when the node is idle (a few seconds).
for _ in $(seq 60); do
    state="$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)"
    if [ "$state" = "idle" ]; then
        echo "start_cluster.sh: cluster up; export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start_cluster.sh: node not idle after 30 s (state '$state'); logs in $run/log" >&2
tail -n 20 "$run/log/slurmctld.log" "$run/log/slurmd.log" >&2 || true
exit 1
