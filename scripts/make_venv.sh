#!/usr/bin/env bash
# Makes the project's virtual environment (the Makefile's .venv, or the folder given) with
# python3's venv module. Debian and Ubuntu ship python3 without it (and mark the system Python
# externally managed, so installing there is refused): then this installs the distribution's
# venv package when it can (root or password-less sudo) and otherwise says what to install.
set -euo pipefail

venv=${1:-.venv}
python=${LDM_BASE_PYTHON:-python3}
command -v "$python" >/dev/null || { echo "make_venv.sh: no $python on PATH; install Python >= 3.10" >&2; exit 1; }

if "$python" -m venv "$venv" 2>/dev/null; then
  exit 0
fi
rm -rf "$venv"  # a failed venv leaves a folder without pip behind

version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
package="python$version-venv"
if ! command -v apt-get >/dev/null; then
  echo "make_venv.sh: '$python -m venv' failed and there is no apt-get here; install Python's venv module" >&2
  exit 1
fi
sudo=()
if ((EUID != 0)); then
  if ! sudo -n true 2>/dev/null; then
    echo "make_venv.sh: '$python -m venv' needs the $package package: sudo apt-get install $package" >&2
    exit 1
  fi
  sudo=(sudo -n)
fi
echo "make_venv.sh: installing $package (python3 here has no venv module)" >&2
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
"$python" -m venv "$venv"
