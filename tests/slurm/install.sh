#!/usr/bin/env bash
# Install a single-node SLURM (Debian packages) for tests/test_slurm.py.
# Idempotent: does nothing when the daemons are already installed.
# Needs root and apt-get; CI runs it before pytest (see Makefile, `make test`).
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install.sh: SLURM already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install.sh: need root and apt-get to install ${missing[*]}; skipping" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
echo "install.sh: installed ${missing[*]}"
