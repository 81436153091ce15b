#!/usr/bin/env bash
# Install tristage into the current Python environment (a virtual environment, or the system's Python).
#
#   launch/install.sh          tristage and its dependencies
#   launch/install.sh --dev    also the test extra (pytest, httpx, selenium) and the browser the collection page's
#                              test drives: Debian's chromium and chromium-driver (apt-get; root or sudo)
#
# torch: when none is installed, the CPU build 2.13.0 (`torch==2.13.0`; a bare `torch` would pull a multi-GB CUDA
# build). On a GPU machine install the torch build for your CUDA first; this script then keeps it.
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (--dev)" >&2; exit 2 ;;
  esac
done

TARGET="."
[ "$DEV" = 1 ] && TARGET=".[dev]"
TORCH=()
"$PYTHON" -c "import torch" 2>/dev/null || TORCH=(torch==2.13.0)
"$PYTHON" -m pip install --quiet "${TORCH[@]}" -e "$TARGET"

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
