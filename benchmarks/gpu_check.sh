#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): on a machine with one NVIDIA GPU and
# only this repository, installs the project and runs every GPU measurement in one go,
# writing gpu_check.json and gpu_check.md to $OUT (default ./gpu-check), in under 8 minutes.
#
#   benchmarks/gpu_check.sh              # the check (needs a CUDA GPU)
#   benchmarks/gpu_check.sh --dry-run    # every step up to its first CUDA call (CI runs it)
#
# Other options go to gpu_check.py (--voc-root DIR, --pretrained, --batch-size, --steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
if ! "$py" -c "import mlic" 2>/dev/null; then
  # the project itself: with its dependencies where a package index is reachable, else
  # over what the machine has (an offline GPU image with torch, timm, ... preinstalled)
  "$py" -m pip install -q -e ".[test]" \
    || "$py" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_check: cannot install the project" >&2; exit 2; }
fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$py" benchmarks/gpu_check.py "$@"
