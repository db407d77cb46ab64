#!/usr/bin/env bash
# Avatars per GPU, one command on a fresh GPU host (about 10 minutes, 2-3 of them pip): the
# environment from bench/gpu_env.sh (a venv with .[gpu,tools,test], onnxruntime-gpu alone), then
# bench/gpu.py, whose report (gpu.json, gpu.md) lands in OUT. Extra arguments go to bench/gpu.py.
#
#   bash bench/gpu.sh /tmp/gpu-report                    # from the repository root
#   bash bench/gpu.sh /tmp/gpu-report --docs             # ... and write the table into docs/BENCHMARKS.md
#   INSTALL=0 VENV=/opt/env bash bench/gpu.sh /tmp/out   # offline host: an environment with the gpu extra
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu.sh OUT_DIR [bench/gpu.py arguments]}
shift
T0=$(date +%s)
PY=${PY:-python3}
VENV=${VENV:-/tmp/lsc-gpu-venv}
step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }

step "machine"
nvidia-smi -L
nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv

. bench/gpu_env.sh  # the venv with .[gpu,tools,test], or INSTALL=0: $VENV as it is
"$VENV/bin/python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

# What is left of 10 minutes after the install, less a minute for the last cell and the report.
LEFT=$(( 540 - ($(date +%s) - T0) ))
step "bench/gpu.py (budget ${LEFT}s) -> $OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
"$VENV/bin/python" bench/gpu.py --out "$OUT" --budget-s "$(( LEFT > 120 ? LEFT : 120 ))" "$@"
step "done in $(( $(date +%s) - T0 ))s"
