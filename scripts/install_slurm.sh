#!/usr/bin/env bash
# Installs what the `slurm` tests need (tests/slurm_cluster.py starts a one-node cluster from it):
# Debian/Ubuntu slurmctld, slurmd, slurm-client and munge, without recommends (8 packages, seconds).
# Idempotent and quiet: does nothing when they are installed. Where it cannot install (no apt-get,
# not root and no password-less sudo) it says so and exits 0, and the slurm tests skip with that
# reason, unless LDM_REQUIRE_SLURM=1 (CI): then both fail.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
((${#missing[@]} == 0)) && exit 0

cannot() {
  if [[ "${LDM_REQUIRE_SLURM:-0}" == 1 ]]; then
    echo "install_slurm.sh: cannot install ${missing[*]}: $1 (LDM_REQUIRE_SLURM=1)" >&2
    exit 1
  fi
  echo "install_slurm.sh: cannot install ${missing[*]}: $1; the slurm tests will skip" >&2
  exit 0
}

command -v apt-get >/dev/null || cannot "no apt-get on this machine"
sudo=()
if ((EUID != 0)); then
  sudo -n true 2>/dev/null || cannot "not root and no password-less sudo"
  sudo=(sudo -n)
fi
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
