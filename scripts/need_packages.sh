#!/usr/bin/env bash
# Usage: scripts/need_packages.sh COMMAND:PACKAGE [COMMAND:PACKAGE...]
#   Makes sure each COMMAND exists, installing the Debian/Ubuntu PACKAGE that provides it with
#   apt-get when it is missing (apt-get update runs once, only when something must be installed).
#   Exit status: 0 when every command exists afterwards; 1 otherwise, with one line on stderr
#   naming what is missing and why (not root, no apt-get, the install failed).
#   Used by the tests' fixtures and scripts that need system tools (slurm-wlm, munge,
#   etcd-server, iproute2); a lock keeps parallel callers from running apt-get twice at once.
set -uo pipefail
missing=()
for pair in "$@"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} = 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "need_packages: ${missing[*]} missing and there is no apt-get here; install them" >&2
  exit 1
fi
if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
  echo "need_packages: ${missing[*]} missing; installing needs root (apt-get install ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
(
  flock 9
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/need_packages.log 2>&1 \
    || { $SUDO apt-get update -q >>/tmp/need_packages.log 2>&1 \
         && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
              >>/tmp/need_packages.log 2>&1; }
) 9>/tmp/shardckpt-apt.lock
status=$?
for pair in "$@"; do
  cmd=${pair%%:*}
  if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ]; then
    echo "need_packages: could not install ${pair#*:} (apt-get status $status; see" \
         "/tmp/need_packages.log: $(tail -n 1 /tmp/need_packages.log 2>/dev/null))" >&2
    exit 1
  fi
done
