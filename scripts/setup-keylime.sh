#!/usr/bin/env bash
# Build a separate virtual environment with Keylime 7.14.3, the reference implementation that
# tests and benchmarks compare edgetrust against. Keylime is never a dependency of edgetrust.
#   scripts/setup-keylime.sh [VENV]    (default: .venv-keylime beside this script's repository)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv-keylime}

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import keylime.ima.ima, keylime.tpm.tpm_util" 2>/dev/null; then
    echo "$venv"
    exit 0
fi

if ! dpkg -s python3-gpg >/dev/null 2>&1 || ! dpkg -s libefivar1 >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-gpg libefivar1 >/dev/null
fi

python3 -m venv "$venv"
"$venv/bin/pip" install -q keylime==7.14.3
# The keylime wheel declares no dependencies; these are the ones its modules import.
"$venv/bin/pip" install -q cryptography sqlalchemy alembic tornado pyyaml typing_extensions \
    requests pyasn1 pyasn1-modules lark packaging pyzmq jsonschema psutil jinja2
# keylime.signing imports gpg; PyPI's gpg does not import on Python 3, Debian's does.
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
gpg_dir=$(dpkg -L python3-gpg | grep 'dist-packages/gpg$' | head -n 1 || true)
[ -n "$gpg_dir" ] || { echo "python3-gpg installs no gpg package directory" >&2; exit 1; }
ln -sfn "$gpg_dir" "$site/gpg"

"$venv/bin/python" -c "import keylime.ima.ima, keylime.tpm.tpm_util" 2>/dev/null
echo "$venv"
