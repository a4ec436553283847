#!/usr/bin/env bash
# Installs those of the Debian packages named that are not installed yet (apt-get update first; sudo
# unless root). tools/setup.sh and tools/labs.sh use it; nothing happens when all are there.
# Usage: tools/install_packages.sh WHO PACKAGE...     (WHO begins the message, e.g. "moelab setup")
set -euo pipefail
who=$1
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "$who: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
