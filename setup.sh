#!/usr/bin/env bash
# Set up protlm in ./.venv (or in the active virtual environment) on a fresh machine.
# torch is installed first, pinned to the CPU build this project targets, so no CUDA build is ever pulled.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PY=.venv/bin/python
else
    PY="$VIRTUAL_ENV/bin/python"
fi
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
# mkdssp derives secondary structure from PDB files (protlm's CASP14 SSP set); Debian ships it as 'dssp'.
if ! command -v mkdssp >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dssp >/dev/null) \
        || echo "setup.sh: could not install dssp (mkdssp); 'protlm data casp14-ssp' will need it" >&2
fi
echo "protlm is set up: $("$PY" -c 'import protlm; print(protlm.__version__)') in $(dirname "$(dirname "$PY")")"
