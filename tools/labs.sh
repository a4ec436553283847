#!/usr/bin/env bash
# Opens the course labs (notebooks/, docs/labs.md) in Jupyter, on a Debian 12 machine:
#   1. installs what is missing: Debian's Jupyter notebook server (jupyter-notebook) and the
#      packages the labs import (nbclient, ipykernel, matplotlib; numpy comes with setup.sh);
#   2. builds the moelab Python module and command line into the build folder, if they are not
#      there (MOELAB_BUILD, default build/: what tools/setup.sh builds);
#   3. builds the corpus (data/corpus) if it is missing;
#   4. starts `jupyter notebook` on notebooks/ with PYTHONPATH=<build>/python:notebooks and
#      MOELAB_ROOT, MOELAB_BIN set, so that `import moelab` and `import labcheck` work in every lab.
#
#   tools/labs.sh                      # then open the URL it prints; extra arguments go to Jupyter
#   tools/labs.sh --no-browser --port 8890
#   tools/labs.sh --run                # no server: execute every lab with its solutions (as the tests do)
#
# The kernel is Debian's python3 (/usr/share/jupyter/kernels/python3 runs /usr/bin/python3), the
# interpreter the module is built for. Idempotent: a second run installs and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${MOELAB_BUILD:-build}
case "$build" in /*) ;; *) build="$root/$build" ;; esac

packages=(python3-notebook jupyter-notebook python3-nbclient python3-nbformat python3-ipykernel
          python3-matplotlib python3-numpy)
tools/install_packages.sh "moelab labs" "${packages[@]}"

if ! compgen -G "$build/python/moelab*.so" >/dev/null || [ ! -x "$build/bin/moelab" ]; then
  echo "moelab labs: building the Python module and the command line in $build"
  [ -f "$build/CMakeCache.txt" ] || cmake --preset default >/dev/null
  cmake --build "$build" --target moelab_python moelab
fi
if [ ! -f data/corpus/manifest.json ]; then
  "$build/bin/moelab" corpus --out data/corpus
fi

export PYTHONPATH="$build/python:$root/notebooks${PYTHONPATH:+:$PYTHONPATH}"
export MOELAB_ROOT="$root" MOELAB_BIN="$build/bin/moelab"

if [ "${1:-}" = "--run" ]; then
  exec /usr/bin/python3 notebooks/run_notebook.py notebooks/[0-9][0-9]_*.ipynb --solutions
fi
as_root=()
[ "$(id -u)" -ne 0 ] || as_root=(--allow-root)   # Jupyter refuses root without it
exec /usr/bin/python3 -m notebook --notebook-dir="$root/notebooks" "${as_root[@]}" "$@"
