# Sourced by bench/gpu_check.sh and bench/gpu_memory.sh (which define PY, VENV and step): the
# environment for the GPU path. INSTALL=1 (default) makes $VENV with the gpu, tools and test extras
# and keeps onnxruntime-gpu alone; INSTALL=0 uses $VENV as it is (a GPU host with no package index
# whose environment already holds the gpu extra's packages).
if [ "${INSTALL:-1}" = 1 ]; then
    step "venv in $VENV with .[gpu,tools,test]"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PY" -m venv "$VENV" 2>/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PY" -m venv "$VENV"
        fi
    fi
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
    "$VENV/bin/pip" install -q -e ".[gpu,tools,test]"
    # The test extra holds the CPU onnxruntime, which installs the same module as onnxruntime-gpu:
    # keep only the GPU one (README "Install").
    "$VENV/bin/pip" uninstall -q -y onnxruntime onnxruntime-gpu
    "$VENV/bin/pip" install -q "onnxruntime-gpu[cuda,cudnn]>=1.17"
else
    step "INSTALL=0: using $VENV as it is (an offline GPU host with the gpu extra already installed)"
fi
