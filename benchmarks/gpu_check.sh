#!/usr/bin/env bash
# The prepared GPU check, from the repository root on a CUDA machine (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh            # full check, figures in $OUT (default ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --tiny     # dry run on a tiny shape
# Wheels the machine lacks (nnsight, transformer-lens, gguf and their dependencies) are installed from .whl/ when
# present; make them here with: python3 ../shared/tools/gpu-wheels.py -d .whl
set -euo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
timeout 480 python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
