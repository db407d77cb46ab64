"""A plain `pip install` (no extras) in a fresh virtualenv: the client library and the management
CLI, working against a real cluster, with no ONNX Runtime, OpenCV or scipy, under 100 MB.

The virtualenv is made here in a temporary folder and the package is installed from a copy of this
source tree the way a user would (a real build, dependencies resolved by pip; pip's cache keeps it
to about half a minute). The cluster runs from the test's own environment, which has the server.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # a fresh virtualenv and pip, then its Python as a subprocess

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MB = 100
NOT_IN_A_PLAIN_INSTALL = ("onnxruntime", "onnx", "cv2", "scipy", "yaml", "psutil", "matplotlib", "aiohttp",
                          "rich", "imageio_ffmpeg", "prometheus_client", "tqdm")

# Runs in the thin virtualenv: what the installed distribution weighs, dependencies included
# (the files pip recorded for it and everything it requires), and what is importable there.
WEIGH = r"""
import importlib.metadata as md, importlib.util, json, sys
from pip._vendor.packaging.requirements import Requirement  # pip's own copy: nothing else installed
seen, todo = {}, ["lipsync-cluster"]
while todo:
    name = todo.pop().lower().replace("_", "-")
    if name in seen:
        continue
    dist = md.distribution(name)
    seen[name] = sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):  # no extras, this platform
            todo.append(req.name)
print(json.dumps({"dists": seen, "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m)],
                  "where": str(md.distribution("lipsync-cluster").locate_file(""))}))
"""

# Runs in the thin virtualenv against the cluster: the library's ops, an infer, a stream.
USE_THE_CLIENT = r"""
import json, sys
import numpy as np
from lipsync_cluster.client import Client, UnknownModel
endpoint = sys.argv[1]
with Client(endpoint, timeout=60) as client:
    health = client.health()
    models = sorted(m["model_id"] for m in client.list_models())
    pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    result = client.infer(models[0], audio_pcm=pcm, batch_size=3, format="raw")
    try:
        client.infer("no_such_model", audio_pcm=pcm, batch_size=1, format="raw")
        unknown = "answered"
    except UnknownModel as exc:
        unknown = exc.code
    try:
        client.infer(models[0], audio_pcm=pcm, batch_size=1, format="jpeg").image(0)
        decode = "decoded"
    except ImportError as exc:  # no OpenCV here: the error names the extra
        decode = str(exc)
    with client.stream(models[0], batch_size=5, format="raw") as session:
        session.push(pcm)
        session.close()
        streamed = [f.index for f in session.frames(timeout=60)]
print(json.dumps({"ready": health.get("ready"), "models": models, "frames": len(result.frames),
                  "shape": list(result.frames[0].shape), "unknown": unknown, "decode": decode, "streamed": streamed,
                  "loaded": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


def _run(cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _thin_python(thin_venv: Path, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The thin virtualenv's python in isolated mode (-I: no current folder, no PYTHON* variables on
    its path), from a folder outside this source tree: it sees only what pip installed."""
    return _run([thin_venv / "bin" / "python", "-I", *args], timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def thin_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with `pip install <this source tree>` and nothing else."""
    where = tmp_path_factory.mktemp("thin")
    src = where / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lipsync_cluster", src / "lipsync_cluster",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = where / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = _run([py, "-m", "pip", "install", "--quiet", str(src)], timeout=600, env=env)
    assert out.returncode == 0, f"pip install failed:\n{out.stdout}\n{out.stderr}"
    return env_dir


def test_a_plain_install_weighs_under_100_mb_and_has_no_server_or_tools(thin_venv, tmp_path):
    out = _thin_python(thin_venv, "-c", WEIGH, *NOT_IN_A_PLAIN_INSTALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    dists = report["dists"]
    assert report["where"].startswith(str(thin_venv)), report["where"]
    assert set(dists) >= {"lipsync-cluster", "numpy", "pyzmq", "msgpack", "click"}, dists
    assert not {"onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "scipy"} & set(dists), dists
    total_mb = sum(dists.values()) / 2**20
    sizes = ", ".join(f"{name} {size / 2**20:.1f}" for name, size in sorted(dists.items(), key=lambda kv: -kv[1]))
    print(f"plain install: {total_mb:.1f} MB ({sizes})")
    assert total_mb < LIMIT_MB, f"the plain install weighs {total_mb:.1f} MB: {sizes}"
    assert report["importable"] == [], "a plain install must not bring these modules"


def test_a_plain_install_is_a_working_client_and_management_cli(thin_venv, make_cluster, tmp_path):
    sup = make_cluster()
    frontend = sup.config.frontend
    cli = thin_venv / "bin" / "lipsync-cluster"
    out = _thin_python(thin_venv, "-c", USE_THE_CLIENT, frontend, *NOT_IN_A_PLAIN_INSTALL, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["ready"] is True and len(seen["models"]) == 3
    assert seen["frames"] == 3 and seen["shape"] == [720, 1280, 3]
    assert seen["unknown"] == "unknown_model"
    assert seen["decode"] == "decoding jpeg frames needs the 'tools' extra: pip install 'lipsync-cluster[tools]'"
    assert seen["streamed"] == list(range(25)), "one second of audio streams as 25 frames in order"
    assert seen["loaded"] == []

    # The management commands, from the thin install's own entry point.
    assert _run([cli, "--help"], cwd=tmp_path).returncode == 0
    models = _run([cli, "models", "--json", "--broker", frontend], cwd=tmp_path)
    assert models.returncode == 0, models.stderr
    assert sorted(m["model_id"] for m in json.loads(models.stdout)) == seen["models"]
    assert _run([cli, "health", "--broker", frontend], cwd=tmp_path).returncode == 0
    stats = _run([cli, "stats", "--once", "--json", "--broker", frontend, "--timeout", "10"], cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr
    assert "totals" in json.loads(stats.stdout)
    load = _run([cli, "load", seen["models"][1], "--broker", frontend], cwd=tmp_path)
    assert load.returncode == 0 and "loaded on" in load.stdout, load.stderr
    unload = _run([cli, "unload", seen["models"][1], "--broker", frontend], cwd=tmp_path)
    assert unload.returncode == 0 and "unloaded from" in unload.stdout, unload.stderr


@pytest.mark.parametrize("argv,extra", [
    (["render", "--model", "demo_ada", "--audio", "{wav}", "--out", "out.mp4"], "tools"),
    (["prepare", "videos", "--models-dir", "models"], "tools"),
    (["demo-models", "demo"], "tools"),
    (["start", "--gpus", "0"], "cpu"),
    (["stats", "--once"], "console"),
    (["loadtest", "-n", "1"], "console"),
    (["gateway"], "gateway"),
])
def test_a_command_whose_extra_is_missing_says_which_in_one_line(thin_venv, tmp_path, argv, extra):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    (tmp_path / "videos").mkdir()
    out = _run([thin_venv / "bin" / "lipsync-cluster", *[a.format(wav=wav) for a in argv]], cwd=tmp_path, timeout=60)
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"needs the '{extra}' extra: pip install 'lipsync-cluster[{extra}]'" in lines[0]
    assert "Traceback" not in out.stderr
