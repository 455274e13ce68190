#!/usr/bin/env bash
# The one prepared GPU check: run on a machine with one NVIDIA GPU and PyTorch (no Ray needed).
# diffusers is installed if missing: from PyPI, or from the wheel (or wheel folder) given as $1 offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import diffusers" 2>/dev/null || pip install -q "${1:-diffusers}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 python bench/gpu.py --device cuda
