#!/usr/bin/env bash
# The GPU path on a machine with a GPU (for a lent GPU machine; about 5 minutes, most of it pip):
#   1. a fresh venv with the project's gpu + test extras as setup.cfg declares them (+ tools, for
#      demo-models), then onnxruntime-gpu alone (test brings the CPU onnxruntime, the same module)
#   2. tests/test_gpu_plan.py (its GPU test runs a real CUDA session and reads NVML there) and
#      tests/test_gpu_engine.py (IO binding, CUDA graphs and fp16 checked against the CPU there)
#   3. a real cluster: `start --gpus 1 --per-gpu 2` on two `unet` demo models, a few infers
#      through the client, then each worker's provider as ONNX Runtime really gave it, its GPU
#      readings (NVML) and nvidia-smi's view of the processes' memory.
# Exit status 0 only when every worker runs the CUDA provider and every infer succeeded.
#
#   INSTALL=0 VENV=/opt/env bash bench/gpu_check.sh  # offline host: an environment that already has the gpu extra
#   bash bench/gpu_check.sh              # from the repository root
#   VENV=/tmp/v PY=python3.11 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
PY=${PY:-python3}
VENV=${VENV:-/tmp/lsc-gpu-venv}
WORK=$(mktemp -d /tmp/lsc-gpu-check.XXXXXX)
CLUSTER_PID=""
step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }
cleanup() {
    if [ -n "$CLUSTER_PID" ] && kill -0 "$CLUSTER_PID" 2>/dev/null; then
        kill -TERM "$CLUSTER_PID"; wait "$CLUSTER_PID" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step "machine"
nvidia-smi -L
nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv

. bench/gpu_env.sh  # the venv with .[gpu,tools,test], or INSTALL=0: $VENV as it is
"$VENV/bin/python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

step "GPU plan and engine tests (IO binding, CUDA graphs and fp16 on the GPU)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu_plan.py tests/test_gpu_engine.py

step "demo models (unet, 2 x 25 frames)"
"$VENV/bin/lipsync-cluster" demo-models "$WORK/models" --count 2 --kind unet --frames 25 >/dev/null

step "start --gpus 1 --per-gpu 2"
"$VENV/bin/lipsync-cluster" start --config "$WORK/models/cluster.yaml" --gpus 1 --per-gpu 2 \
    --metrics-port 5558 > "$WORK/cluster.log" 2>&1 &
CLUSTER_PID=$!
for _ in $(seq 1 180); do
    if grep -q "lipsync-cluster ready" "$WORK/cluster.log"; then break; fi
    if ! kill -0 "$CLUSTER_PID" 2>/dev/null; then cat "$WORK/cluster.log"; exit 1; fi
    sleep 1
done
grep -q "lipsync-cluster ready" "$WORK/cluster.log" || { cat "$WORK/cluster.log"; echo "not ready in 180 s"; exit 1; }
grep -E "ready:|GPU" "$WORK/cluster.log" | head -5

step "infers through the client, providers, GPU readings"
"$VENV/bin/python" - <<'EOF'
import json, sys, time, urllib.request
import numpy as np
from lipsync_cluster.client import Client

with Client("tcp://127.0.0.1:5555", timeout=120) as client:
    models = sorted(m["model_id"] for m in client.list_models())
    feats = np.random.default_rng(0).standard_normal((5, 32, 16, 16)).astype(np.float32)
    for model in models:
        for i in range(4):
            t = time.perf_counter()
            r = client.infer(model, audio_features=feats, start_frame_idx=i * 5, batch_size=5, format="jpeg")
            print(f"{model} #{i}: {len(r.frames)} frames on {r.worker} in {1000 * (time.perf_counter() - t):.0f} ms"
                  f"{' (loaded the model)' if r.model_loaded else ''}")
    time.sleep(2.5)  # the workers' next stats carry their GPU readings
    health = client.health()
    workers = client.model_stats()["workers"]
print("health:", json.dumps(health))
for w in workers:
    gib = {k: round(w[k] / 2**30, 2) for k in ("gpu_memory_used_bytes", "gpu_device_memory_used_bytes",
                                               "gpu_memory_total_bytes") if k in w}
    print(f"{w['worker']}: provider={w.get('provider')} device={w.get('device')} gpu={w.get('gpu')} "
          f"GiB={gib} utilization={w.get('gpu_utilization')}")
text = urllib.request.urlopen("http://127.0.0.1:5558/metrics", timeout=5).read().decode()
print("\n".join(l for l in text.splitlines() if l.startswith(("lipsync_worker_gpu_", "lipsync_worker_info"))))
bad = [w["worker"] for w in workers if w.get("provider") != "cuda"]
if bad or len(workers) != 2:
    sys.exit(f"FAIL: workers not on CUDA: {bad} (of {len(workers)})")
print("OK: every worker runs the CUDA provider")
EOF

step "nvidia-smi: the workers' processes"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
step "done in $(( $(date +%s) - T0 )) s"
