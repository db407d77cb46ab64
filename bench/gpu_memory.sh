#!/usr/bin/env bash
# Worker memory on a GPU (for a lent GPU machine; about 5 minutes, most of it pip): the table of
# bench/memory.py -- one worker process per row holding 1, 2, 3 `unet` demo models, one request per
# model at batch 5 then 25 -- with the worker on the CUDA provider. The budget
# (capacity.max_memory_gb) then holds the process's GPU memory: the shared CUDA arena is capped at
# it, models are measured through NVML. Printed per row: host peak RSS, the process's GPU memory
# (NVML, the most seen after any request), what the worker reports, and nvidia-smi's view.
#
#   INSTALL=0 VENV=/opt/env bash bench/gpu_memory.sh  # offline host: an environment that already has the gpu extra
#   bash bench/gpu_memory.sh                 # from the repository root
#   BUDGET_GB=6 VENV=/tmp/v PY=python3.11 bash bench/gpu_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
PY=${PY:-python3}
VENV=${VENV:-/tmp/lsc-gpu-venv}
BUDGET_GB=${BUDGET_GB:-6}
WORK=$(mktemp -d /tmp/lsc-gpu-memory.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }

step "machine"
nvidia-smi -L
nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv

. bench/gpu_env.sh  # the venv with .[gpu,tools,test], or INSTALL=0: $VENV as it is
"$VENV/bin/python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

step "3 unet demo models (12 frames, 1280x720)"
"$VENV/bin/lipsync-cluster" demo-models "$WORK/models" --count 3 --kind unet --frames 12 >/dev/null
ls "$WORK/models"

step "CPU worker, same table, for comparison (budget 3 GB, 1 and 3 models)"
"$VENV/bin/python" bench/memory.py --quick --models "$WORK/models" --budget-gb 3 || echo "(CPU rows failed)"

step "GPU worker: budget ${BUDGET_GB} GB of GPU memory, 1, 2, 3 models, batch 5 then 25"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
"$VENV/bin/python" bench/memory.py --gpu --no-docs --models "$WORK/models" --budget-gb "$BUDGET_GB" &
BENCH=$!
# nvidia-smi's own view of the worker processes while the rows run
while kill -0 "$BENCH" 2>/dev/null; do
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | sed 's/^/   nvidia-smi: /'
    sleep 2
done
wait "$BENCH"

step "done in $(( $(date +%s) - T0 ))s"
