#!/usr/bin/env bash
# Install what edgetrust needs on a Debian 12 machine and the project into .venv.
# Safe to run again: it installs only what is missing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

debian_packages=(
    swtpm swtpm-tools          # software TPM 2.0 for the emulated device and the tests
    tpm2-tools                 # independent TPM implementation the tests compare against
    libtss2-dev pkg-config     # TPM software stack that tpm2-pytss builds against
    gcc libssl-dev             # the native IMA fast paths (evidence/ima/_accel.c) link libcrypto
    postgresql-15              # the scale-out database, started privately by the tests
    docker-registry            # OCI registry for image-signature tests
    python3-gpg libefivar1     # needed by Keylime, the reference the tests compare against
)
missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    echo "installing Debian packages: ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "edgetrust needs Python 3.11; $python is $("$python" --version 2>&1). Set PYTHON=..." >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[device,kubernetes,demo,test]"
echo "edgetrust installed in $root/.venv"
