#!/usr/bin/env bash
# Usage: scripts/setup.sh
#   Prepares a fresh machine for shardckpt: the zstd and xxhash development files (apt-get,
#   when missing and possible), a virtual environment in $VENV (default .venv) with the CPU
#   build of torch, and an editable install of shardckpt with its native core built. Safe to run again: it rebuilds
#   only when the native sources changed. Environment:
#     VENV=.venv  PYTHON=python3  TORCH_SPEC='torch==2.13.0'  EXTRAS=test
#     TORCHTITAN_SPEC='torchtitan==0.3.0' (installed --no-deps when EXTRAS has test or torchtitan)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCHTITAN_SPEC=${TORCHTITAN_SPEC:-torchtitan==0.3.0}
EXTRAS=${EXTRAS:-test}

have_header() { echo "#include <$1>" | ${CC:-cc} -E -x c - >/dev/null 2>&1; }

# System libraries the native core links: header -> Debian package.
need_dev() {  # need_dev HEADER PACKAGE FEDORA-PACKAGE BREW-FORMULA
  have_header "$1" && return 0
  echo "setup: $1 missing; installing $2" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    $SUDO apt-get install -y -q "$2" >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$2" >/dev/null; }
  fi
  if ! have_header "$1"; then
    echo "setup: cannot install the development files of $1 here. Install them and rerun:" >&2
    echo "  Debian/Ubuntu: apt-get install $2   Fedora: dnf install $3   macOS: brew install $4" >&2
    exit 1
  fi
}
need_dev zstd.h libzstd-dev libzstd-devel zstd
need_dev xxhash.h libxxhash-dev xxhash-devel xxhash

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"

# Rebuild the native core only when what it is built from changed.
stamp="$VENV/.shardckpt-build"
# The editable install maps each Python file by name, so a module added or removed counts too.
want=$(cat pyproject.toml CMakeLists.txt shardckpt/_version.py $(find csrc -type f | sort) \
       <(echo "$EXTRAS") <(find shardckpt -name '*.py' | sort) | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
   || ! "$VENV/bin/python" -c "import shardckpt._native" 2>/dev/null; then
  "${PIP[@]}" install "scikit-build-core>=0.10" "nanobind>=2.0"
  "${PIP[@]}" install --no-build-isolation -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
# torchtitan without its dependencies (pyproject.toml, extra torchtitan, says why); then every
# integration must still import beside it, with torch untouched.
if [[ ",$EXTRAS," == *,test,* || ",$EXTRAS," == *,torchtitan,* ]]; then
  want_titan=${TORCHTITAN_SPEC#*==}
  have_titan=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torchtitan'))" 2>/dev/null || true)
  [ "$have_titan" = "$want_titan" ] || "${PIP[@]}" install --no-deps "$TORCHTITAN_SPEC"
  "$VENV/bin/python" scripts/check_extras.py --torch "${TORCH_SPEC#*==}"
fi
"$VENV/bin/python" -c "import shardckpt._native as n; print('setup: shardckpt', n.__version__, 'native core ready:', n.features())"
