#!/usr/bin/env bash
# Install a one-node SLURM (Debian packages slurm-wlm + munge) for tests/test_slurm.py.
# Idempotent: does nothing when slurmctld, slurmd and munged are already on PATH.
# CI calls this before `make test`; without SLURM the SLURM tests skip, so a failure
# here prints one clear line and exits 1 instead of failing silently.
set -euo pipefail

# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null
}

if have_all; then
    echo "install_slurm: SLURM already installed ($(slurmctld -V 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install_slurm: cannot install SLURM: apt-get not found (need a Debian/Ubuntu machine); SLURM tests will skip" >&2
    exit 1
fi

# apt-get needs root; use sudo only when we are not root already.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "install_slurm: cannot install SLURM: not root and no sudo; SLURM tests will skip" >&2
        exit 1
    fi
fi

# noninteractive: the munge/slurm postinst scripts must not prompt in CI.
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq \
    || ! $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; then
    echo "install_slurm: cannot install SLURM: 'apt-get install slurm-wlm munge' failed; SLURM tests will skip" >&2
    exit 1
fi

# The packages' postinst may start system daemons (no systemd in containers, so usually
# not); the tests start their own private munged/slurmctld/slurmd and do not need them.
if have_all; then
    echo "install_slurm: installed $(slurmctld -V)"
else
    echo "install_slurm: cannot install SLURM: packages installed but slurmctld/slurmd/munged/sbatch not on PATH" >&2
    exit 1
fi
