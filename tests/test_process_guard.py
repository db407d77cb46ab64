"""The tier check (tests/process_guard.py, wired in conftest): a test without the `processes`
marker that starts a process fails, naming it; marked tests and in-process ones pass. Runs a small
pytest session in a subprocess with this suite's conftest, so it is itself in the slow tier."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

TESTS = Path(__file__).parent

INNER_CONFTEST = f"""
import importlib.util, sys
sys.path.insert(0, {str(TESTS)!r})
spec = importlib.util.spec_from_file_location("suite_conftest", {str(TESTS / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
globals().update({{k: v for k, v in vars(suite).items() if k.startswith("pytest_runtest_")}})
"""

INNER_TESTS = """
import multiprocessing as mp, socket, subprocess, sys, threading, time
from concurrent.futures import ProcessPoolExecutor
import pytest

def test_unmarked_run():
    subprocess.run([sys.executable, "-c", "pass"])

@pytest.mark.processes
def test_marked_run():
    subprocess.run([sys.executable, "-c", "pass"])

def test_unmarked_from_a_thread():
    t = threading.Thread(target=subprocess.run, args=(["true"],))
    t.start(); t.join()

def test_unmarked_left_running():
    LEFT.append(subprocess.Popen(["sleep", "30"]))

LEFT = []

def teardown_module():
    for p in LEFT:
        p.kill(); p.wait()

def test_unmarked_pool():  # multiprocessing's own launch raises no audit event
    with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as ex:
        assert list(ex.map(abs, [-1])) == [1]

def test_unmarked_pool_again():  # the forkserver already runs: only its reaping tells
    with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as ex:
        assert list(ex.map(abs, [-2])) == [2]

def test_in_process():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.close()
    t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()

def test_fails_and_spawns():
    subprocess.run(["true"])
    assert False, "its own failure"
"""


def test_unmarked_tests_that_start_processes_fail_and_say_what_they_started(tmp_path):
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    processes: starts processes\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    text = out.stdout + out.stderr
    outcome = {line.split()[1].split("::")[-1]: line.split()[0] for line in text.splitlines()
               if line.startswith(("PASSED ", "FAILED ", "ERROR "))}
    assert outcome == {
        "test_unmarked_run": "FAILED", "test_marked_run": "PASSED", "test_unmarked_from_a_thread": "FAILED",
        "test_unmarked_left_running": "FAILED", "test_unmarked_pool": "FAILED", "test_unmarked_pool_again": "FAILED",
        "test_in_process": "PASSED", "test_fails_and_spawns": "FAILED"}, text[-4000:]
    assert "test_unmarked_run started processes but carries no `processes` marker" in text
    assert "subprocess.Popen" in text and "sleep" in text and "still running" in text
    assert "reaped a child" in text
    assert "its own failure" in text and "process tier check" in text, "a failing test keeps its own error"
