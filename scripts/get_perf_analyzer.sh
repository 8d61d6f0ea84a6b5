#!/usr/bin/env bash
# Installs Triton's perf_analyzer where bench/bench_serving.py looks for it (~/.cache/histosynth/perf_analyzer,
# or $HISTOSYNTH_PERF_ANALYZER_HOME): bin/perf_analyzer plus lib/ with what it links.
#
# Why not `pip install perf-analyzer`: its wheels (2.58-2.60) are built for glibc 2.38 / GLIBCXX_3.4.32, and this
# machine kind (Debian 12) has glibc 2.36, so that binary does not start here. tritonclient 2.45.0's manylinux1
# wheel still ships perf_analyzer built for glibc <= 2.34; it links libb64 (Debian libb64-0d) and libcudart.so.12
# (loaded even on CPU; taken from the nvidia-cuda-runtime-cu12 wheel, no GPU needed). Wheels are fetched with
# pip download, nothing is installed into the venv.
set -euo pipefail
HOME_DIR="${HISTOSYNTH_PERF_ANALYZER_HOME:-$HOME/.cache/histosynth/perf_analyzer}"
PY="$(realpath "${PY:-.venv/bin/python}")"
if [ -x "$HOME_DIR/bin/perf_analyzer" ] && LD_LIBRARY_PATH="$HOME_DIR/lib" "$HOME_DIR/bin/perf_analyzer" --version >/dev/null 2>&1; then
  echo "perf_analyzer already in $HOME_DIR"; exit 0
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  $SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1; $SUDO apt-get install -y -qq --no-install-recommends libb64-0d; }
fi
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d "$WORK" "tritonclient==2.45.0"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK" "nvidia-cuda-runtime-cu12==12.9.79"
mkdir -p "$HOME_DIR/bin" "$HOME_DIR/lib"
(cd "$WORK" && "$PY" -m zipfile -e tritonclient-2.45.0-*.whl tc && "$PY" -m zipfile -e nvidia_cuda_runtime_cu12-*.whl cuda)
cp "$WORK"/tc/tritonclient-2.45.0.data/data/bin/perf_analyzer "$HOME_DIR/bin/perf_analyzer"
chmod +x "$HOME_DIR/bin/perf_analyzer"
cp "$WORK"/cuda/nvidia/cuda_runtime/lib/libcudart.so.12 "$HOME_DIR/lib/"
LD_LIBRARY_PATH="$HOME_DIR/lib" "$HOME_DIR/bin/perf_analyzer" --version
echo "installed perf_analyzer into $HOME_DIR"
