"""The GPU path: what each worker is given (a pure plan, checked on machines without a GPU), what
`start` and `worker` say when a GPU is not there, and the provider a worker really gets. On a
machine with a GPU the last test runs a real CUDA session (bench/gpu_check.sh runs this file)."""
from __future__ import annotations

import os
import subprocess
import sys
import pytest

from lipsync_cluster import gpu_select
from lipsync_cluster.config import load_config
from lipsync_cluster.gpu_select import Device, GpuSelectionError, parse_nvidia_smi, parse_request, plan_workers, select
from lipsync_cluster.supervisor import Supervisor
from lipsync_cluster.worker.sessions import SessionOptions, make_session, probe_provider, providers_for

from waiting import wait_until

FOUR = "\n".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i}aaaaaaa-0000-1111-2222-33333333333{i})" for i in range(4))
UUIDS = [f"GPU-{i}aaaaaaa-0000-1111-2222-33333333333{i}" for i in range(4)]
MIG = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
  MIG 3g.20gb     Device  1: (UUID: MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c98e3a6b)
"""


def plan(request, env: dict, smi: str = FOUR, per_gpu: int = 2):
    """The per-worker plan `start --gpus REQUEST --per-gpu N` makes on a host listing ``smi``."""
    devices = select(parse_request(request) if isinstance(request, str) else request, env, parse_nvidia_smi(smi))
    cfg = load_config({"cluster": {"per_gpu": per_gpu}})
    sup = Supervisor(cfg, request, per_gpu, devices=devices)
    sup._plan("/nonexistent/effective-config.yaml")
    return sup.children[0], sup.children[1:]


def pins(workers) -> list[str]:
    return [w.env["CUDA_VISIBLE_DEVICES"] for w in workers]


def test_each_gpu_worker_is_pinned_to_its_gpu_by_uuid_in_pci_order():
    broker, workers = plan("4", {}, per_gpu=6)
    assert broker.name == "broker" and "--gpu" not in broker.argv
    assert len(workers) == 24 and len({w.name for w in workers}) == 24
    assert pins(workers) == [u for u in UUIDS for _ in range(6)]
    for w in workers:
        assert w.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        index = w.argv[w.argv.index("--gpu-index") + 1]
        assert w.argv[w.argv.index("--gpu") + 1] == "0"              # its one GPU is device 0 inside
        assert w.name.endswith(f"-gpu{index}") and w.env["CUDA_VISIBLE_DEVICES"] == UUIDS[int(index)]


def test_an_inherited_cuda_visible_devices_is_the_universe_split():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert pins(plan("auto", env, per_gpu=1)[1]) == [UUIDS[2], UUIDS[3]]
    assert pins(plan("1", env, per_gpu=1)[1]) == [UUIDS[2]]
    # indices are positions in what is visible, as CUDA numbers devices inside this process
    assert pins(plan("1", env, per_gpu=1)[1]) != pins(plan("1,0", env, per_gpu=1)[1])
    assert pins(plan("1,0", env, per_gpu=1)[1]) == [UUIDS[3], UUIDS[2]]
    with pytest.raises(GpuSelectionError, match=r"--gpus 3: only 2 GPU\(s\) visible \(CUDA_VISIBLE_DEVICES='2,3'\)"):
        plan("3", env)
    with pytest.raises(GpuSelectionError, match="GPU 2 is not visible"):
        plan("0,2", env)
    # an inherited UUID list, and entries that name no device of this host
    env = {"CUDA_VISIBLE_DEVICES": f"{UUIDS[1]},GPU-ffffffff-dead"}
    assert pins(plan("auto", env, per_gpu=1)[1]) == [UUIDS[1]]
    with pytest.raises(GpuSelectionError, match="not on this host: GPU-ffffffff-dead"):
        plan("2", env)
    # hidden: a blank value or -1 hides every GPU, like CUDA
    for hidden in ("", "-1", "-1,0"):
        assert plan("auto", {"CUDA_VISIBLE_DEVICES": hidden})[1][0].name == "w0-cpu"


def test_gpus_by_uuid_and_mig_instances():
    _, workers = plan(f"{UUIDS[3]},{UUIDS[0][:12]}", {}, per_gpu=1)        # a unique prefix is enough
    assert pins(workers) == [UUIDS[3], UUIDS[0]]
    assert [w.name for w in workers] == ["w0-gpu0", "w1-gpu1"]
    with pytest.raises(GpuSelectionError, match="named twice"):
        plan(f"{UUIDS[1]},1", {})
    with pytest.raises(GpuSelectionError, match="GPU GPU-00000000 is not visible; 4 GPU"):
        plan("GPU-00000000", {})
    # A GPU split into MIG instances counts as its instances; its sibling without MIG as itself.
    devices = parse_nvidia_smi(MIG)
    assert [d.uuid for d in devices] == ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f",
                                         "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb",
                                         "GPU-e91edf3b-b297-37c1-a2a7-7601c98e3a6b"]
    assert pins(plan("auto", {}, smi=MIG, per_gpu=1)[1]) == [d.uuid for d in devices]
    env = {"CUDA_VISIBLE_DEVICES": "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"}  # as a MIG setup hands it over
    assert pins(plan("auto", env, smi=MIG)[1]) == ["MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"] * 2
    # without nvidia-smi (a container without driver tools) an inherited list is trusted as it is
    assert select("auto", {"CUDA_VISIBLE_DEVICES": "3,MIG-x1"}, None) == [Device("3"), Device("MIG-x1", "MIG-x1")]


def test_cpu_workers_see_no_gpu_and_ask_for_none():
    _, workers = plan(0, {"CUDA_VISIBLE_DEVICES": "0"}, per_gpu=3)
    assert len(workers) == 3
    for w in workers:
        assert w.env["CUDA_VISIBLE_DEVICES"] == "" and "--gpu" not in w.argv
        assert w.argv[w.argv.index("--workers-on-host") + 1] == "3"
    assert [s.env for s in plan_workers([], 1)] == [{"CUDA_VISIBLE_DEVICES": ""}]


def test_bad_requests_say_what_is_expected():
    for text in ("two", "1,,2", "gpu0", "-1"):
        with pytest.raises(GpuSelectionError, match="expected a number, 'auto', or a comma-separated list"):
            parse_request(text)
    assert parse_request(" Auto ") == "auto" and parse_request("3") == 3 and parse_request("2,3") == ["2", "3"]


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipsync_cluster.cli", *args], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in env.items()})


@pytest.mark.skipif(bool(gpu_select.probe_physical()), reason="this machine has a GPU: the refusal needs one without")
@pytest.mark.processes
def test_start_and_worker_refuse_a_gpu_that_is_not_there(demo_dir):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = _cli("start", "--models-dir", str(demo_dir), "--gpus", "2", env=env)
    assert out.returncode != 0
    assert "--gpus 2: only 0 GPU(s) visible (nvidia-smi -L): none" in out.stderr, out.stderr
    out = _cli("start", "--models-dir", str(demo_dir), "--gpus", "GPU-0123", env={**env, "CUDA_VISIBLE_DEVICES": "GPU-0123"})
    assert out.returncode != 0 and "not on this host: GPU-0123" in out.stderr, out.stderr
    out = _cli("worker", "--models-dir", str(demo_dir), "--broker", "tcp://127.0.0.1:1", "--gpu", "1", env=env)
    assert out.returncode != 0 and "GPU 1 is not visible" in out.stderr, out.stderr
    out = _cli("start", "--models-dir", str(demo_dir), "--gpus", "1;2", env=env)
    assert out.returncode == 2 and "Invalid value for --gpus: --gpus '1;2': expected a number" in out.stderr


def test_providers_cuda_arena_bounded_by_budget_cpu_alone():
    cuda = providers_for(SessionOptions(gpu=0, gpu_mem_limit_bytes=4 * 2**30))
    name, options = cuda[0]
    assert name == "CUDAExecutionProvider" and cuda[1] == "CPUExecutionProvider"
    assert options["device_id"] == 0 and options["gpu_mem_limit"] == 4 * 2**30
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert providers_for(SessionOptions()) == ["CPUExecutionProvider"]


@pytest.mark.processes
def test_cpu_session_uses_only_the_cpu_provider_and_prints_nothing(demo_dir):
    session = make_session(demo_dir / "demo_ada" / "model.onnx", SessionOptions(intra_op_threads=1))
    assert session.get_providers() == ["CPUExecutionProvider"]
    # a whole worker start on a CPU machine: no CUDA error lines on stderr
    code = ("from lipsync_cluster.worker.sessions import make_session, SessionOptions;"
            f"make_session({str(demo_dir / 'demo_ada' / 'model.onnx')!r}, SessionOptions(intra_op_threads=1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0
    assert "CUDA" not in out.stderr and "cuda" not in out.stderr.lower(), out.stderr


@pytest.mark.processes
def test_a_worker_reports_the_provider_it_really_got(make_cluster):
    """Asked for CUDA where ONNX Runtime cannot open it, the probe says `cpu`; a running cluster's
    health, model_stats and list_models say what each worker's sessions really run on."""
    from lipsync_cluster.client import Client

    if not gpu_select.probe_physical():
        assert probe_provider(SessionOptions(gpu=0)) == "cpu"  # asked for CUDA, got the CPU
    assert probe_provider(SessionOptions()) == "cpu"
    sup = make_cluster()
    with Client(sup.config.frontend, timeout=30) as client:
        # each worker's first stats follow its `ready`
        wait_until(lambda: client.health()["providers"] == {"cpu": 2}, 10, "both workers' providers in health")
        assert {w["worker"]: w["provider"] for w in client.model_stats()["workers"]} == {"w0-cpu": "cpu", "w1-cpu": "cpu"}
        # the UNets' engine and precision, as each worker uses them (worker/engine.py)
        assert client.health()["engines"] == {"cpu": 2}
        assert {(w["engine"], w["engine_note"], w["precision"]) for w in client.model_stats()["workers"]} == {("cpu", "", "fp32")}
        client.load_model("demo_ada")
        # the per-model entries come with the worker's next periodic stats
        entry = wait_until(lambda: next((m for m in client.list_models()
                                         if m["model_id"] == "demo_ada" and m["stats"]["workers"]), None), 10,
                           "demo_ada's per-worker stats")
        assert [w["provider"] for w in entry["stats"]["workers"]] == ["cpu"]


@pytest.mark.skipif(not gpu_select.probe_physical(), reason="needs a GPU (bench/gpu_check.sh runs it on one)")
@pytest.mark.processes
def test_on_a_gpu_the_worker_gets_cuda_and_reads_its_gpu():
    from lipsync_cluster.worker.gpu_monitor import GpuMonitor

    device = gpu_select.probe_physical()[0]
    code = ("from lipsync_cluster.worker.sessions import probe_provider, SessionOptions;"
            "print(probe_provider(SessionOptions(gpu=0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": device.pin, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert out.stdout.strip() == "cuda", out.stderr
    reading = GpuMonitor(device.pin).read()
    assert 0 < reading["gpu_device_memory_used_bytes"] <= reading["gpu_memory_total_bytes"]
