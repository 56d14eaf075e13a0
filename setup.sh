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
# System packages, on Debian/Ubuntu when run as root:
# - dssp: mkdssp derives secondary structure from PDB files (protlm's CASP14 SSP set);
# - libtcmalloc-minimal4: 'protlm evaluate' runs under tcmalloc when it is there (1.3x faster head training
#   than glibc's malloc; src/protlm/cli/allocator.py).
missing=()
command -v mkdssp >/dev/null 2>&1 || missing+=(dssp)
ldconfig -p 2>/dev/null | grep libtcmalloc_minimal.so.4 >/dev/null || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "setup.sh: could not install ${missing[*]}; 'protlm data casp14-ssp' needs mkdssp, and" \
                "'protlm evaluate' falls back to glibc's malloc without tcmalloc" >&2
fi
echo "protlm is set up: $("$PY" -c 'import protlm; print(protlm.__version__)') in $(dirname "$(dirname "$PY")")"
