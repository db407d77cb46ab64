"""What the CLI prints a new user: commands that work as pasted, one-line errors, honest labels.

Real processes and sockets: the printed commands are run with the venv off PATH, a real
cluster answers `health`/`load`/`stats`, and errors come from real key files and ports.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lipsync_cluster.cli import NEEDS, main
from lipsync_cluster.common.errors import BadRequest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _no_venv_env(**extra: str) -> dict:
    """The environment of a shell where the venv is not activated: only the system's PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    env.update(extra)
    return env


def _every_command(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _every_command(command, prefix + (name,))


def test_every_commands_help_has_an_example():
    missing = []
    for path, _ in _every_command(main):
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        if "Example" not in result.output:
            missing.append(" ".join(path))
    assert not missing, f"--help without an example: {missing}"


@pytest.mark.processes
def test_demo_models_next_command_works_as_pasted_outside_the_venv(tmp_path):
    cli = Path(sys.executable).parent / "lipsync-cluster"
    out = subprocess.run([str(cli), "demo-models", str(tmp_path / "dm"), "--count", "1", "--frames", "2",
                          "--size", "64x64", "--quiet"], capture_output=True, text=True, timeout=120,
                         env=_no_venv_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    command = shlex.split(lines[lines.index("Next:") + 1])
    assert command[1:3] == ["start", "--config"] and Path(tmp_path, command[3]).is_file(), command
    # the printed program runs in a shell without the venv on PATH (a bare name would not)
    check = subprocess.run([command[0], "start", "--help"], capture_output=True, text=True, timeout=60,
                           env=_no_venv_env(), cwd=tmp_path)
    assert check.returncode == 0 and "Example" in check.stdout, check.stderr


@pytest.mark.processes
def test_printed_python_command_imports_the_client_outside_the_venv(tmp_path):
    from lipsync_cluster.common.invocation import python_command

    out = subprocess.run(shlex.split(python_command()) + ["-c", "from lipsync_cluster.client import Client"],
                         capture_output=True, text=True, timeout=60, env=_no_venv_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr


def _key_folders(tmp_path: Path) -> dict[str, Path]:
    from lipsync_cluster.common.security import generate_keys

    loose = tmp_path / "loose"
    generate_keys(loose)
    os.chmod(loose / "client.key_secret", 0o644)
    return {"missing folder": tmp_path / "no_such_keys", "0644 secret key": loose}


@pytest.mark.parametrize("args", [["health"], ["models"], ["stats", "--once"], ["stats", "--once", "--json"],
                                  ["load", "demo_ada"], ["unload", "demo_ada"], ["loadtest", "--models", "demo_ada", "-n", "1"],
                                  ["render", "--model", "demo_ada", "--audio", __file__, "--out", "x.mp4"]])
def test_key_errors_are_one_line_not_a_traceback(tmp_path, monkeypatch, args):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for what, folder in _key_folders(tmp_path).items():
        monkeypatch.setenv("LIPSYNC_KEYS_DIR", str(folder))
        extra = ["--broker", endpoint] if args[0] != "stats" else ["--broker", endpoint, "--timeout", "0.5"]
        result = CliRunner().invoke(main, [*args, *extra])
        assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (what, result.exception)
        assert result.output.startswith("Error: ") and "Traceback" not in result.output, (what, result.output)
        assert str(folder) in result.output, (what, result.output)


def test_no_reply_advises_starting_a_cluster_not_running_health_again():
    started = time.monotonic()
    result = CliRunner().invoke(main, ["health", "--broker", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5"])
    assert result.exit_code == 1 and result.output.startswith("Error: unavailable: ")
    assert "lipsync-cluster start" in result.output and "(lipsync-cluster health)" not in result.output
    assert time.monotonic() - started < 5


def test_stats_once_without_a_broker_takes_the_time_it_says():
    timeout = 2.0
    started = time.monotonic()
    result = CliRunner().invoke(main, ["stats", "--once", "--json", "--broker-stats", f"tcp://127.0.0.1:{free_port()}",
                                       "--broker", f"tcp://127.0.0.1:{free_port()}", "--timeout", str(timeout)])
    took = time.monotonic() - started
    assert result.exit_code == 1 and f"within {timeout:g} s" in result.stderr
    assert took < timeout + 1.5, f"said {timeout:g} s, took {took:.1f} s"


def test_client_side_checks_use_the_request_rules_words():
    from lipsync_cluster.client.stream import StreamCore
    from lipsync_cluster.common.infer_request import MAX_BATCH_SIZE, require_int

    with pytest.raises(BadRequest) as got:
        StreamCore("demo_ada", batch_size=40)
    with pytest.raises(BadRequest) as rule:
        require_int({"batch_size": 40}, "batch_size", 1, MAX_BATCH_SIZE)
    assert got.value.message == rule.value.message == f"field 'batch_size' is 40; expected an integer in 1..{MAX_BATCH_SIZE}"
    for fmt, bad, good in (("jpeg", 0, 1), ("png", 10, 0)):
        with pytest.raises(BadRequest, match="field 'quality' is"):
            StreamCore("demo_ada", format=fmt, quality=bad)
        StreamCore("demo_ada", format=fmt, quality=good)


@pytest.mark.parametrize("fmt,bad,limit", [("jpeg", 0, "1..100"), ("png", 10, "0..9")])
def test_render_and_loadtest_check_quality_per_format_up_front(fmt, bad, limit):
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: the check comes before any request
    for args in (["render", "--model", "demo_ada", "--audio", __file__, "--out", "x.mp4"],
                 ["loadtest", "--models", "demo_ada", "-n", "1"]):
        result = CliRunner().invoke(main, [*args, "--format", fmt, "--quality", str(bad), "--broker", endpoint])
        assert result.exit_code == 2, result.output
        assert f"field 'quality' is {bad}; expected an integer in {limit}" in result.output, result.output
        assert result.output.count("expected an integer") == 1


def test_loadtest_batch_range_is_the_brokers():
    from lipsync_cluster.common.infer_request import MAX_BATCH_SIZE

    result = CliRunner().invoke(main, ["loadtest", "-b", str(MAX_BATCH_SIZE + 1), "--broker", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and f"1<=x<={MAX_BATCH_SIZE}" in result.output.replace(" ", ""), result.output


def test_stats_header_says_what_errors_count():
    from rich.console import Console

    from lipsync_cluster.tools.console import render

    snapshot = {"totals": {"requests": 95, "ok": 94, "errors": {"bad_request": 30, "unknown_model": 6}},
                "health": {"ready": True}}
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(render(snapshot, []))
    text = console.export_text()
    assert "requests 95  ok 94" in text
    assert "errors, all ops incl. refused 36 (bad_request 30, unknown_model 6)" in text


def test_make_run_installs_what_the_readmes_commands_after_it_need():
    makefile = (ROOT / "Makefile").read_text()
    run_extras = re.search(r"^RUN_EXTRAS := (.+)$", makefile, re.M).group(1).split(",")
    readme = (ROOT / "README.md").read_text()
    said = re.search(r"`make run` installs `\[([^\]]+)\]`", readme).group(1).split(",")
    assert said == ["RUNTIME" if e == "$(RUNTIME)" else e for e in run_extras], "README and Makefile disagree"
    after = readme[readme.index("`make run` prints the endpoints"):]
    needed = set()
    for line in re.findall(r"^\.venv/bin/lipsync-cluster (.+)$", after, re.M):
        needed.update(NEEDS.get(line.split()[0], ()))
        needed.update(["plot"] if "--plot" in line else [])
    for line in re.findall(r"^\| `lipsync-cluster (\S+)", readme, re.M):  # the command table
        needed.update(e for e in NEEDS.get(line, ()) if e not in ("cpu", "gpu"))
    assert needed and needed <= set(run_extras) | {"cpu"}, f"make run lacks {needed - set(run_extras)}"


@pytest.mark.processes
def test_messages_against_a_running_cluster(make_cluster, demo_dir):
    sup = make_cluster()
    cfg = sup.config
    models = sorted(p.name for p in demo_dir.iterdir() if (p / "model.yaml").exists())
    broker = ["--broker", cfg.frontend]

    result = CliRunner().invoke(main, ["health", *broker])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ready; 2 worker(s)") and '"id"' not in result.output
    body = json.loads(CliRunner().invoke(main, ["health", "--json", *broker]).output)
    assert body["ready"] is True and "id" not in body

    first = CliRunner().invoke(main, ["load", models[0], *broker])
    assert first.exit_code == 0 and " loaded on " in first.output and " ms" in first.output, first.output
    again = CliRunner().invoke(main, ["load", models[0], *broker])
    assert again.exit_code == 0 and "already loaded on " in again.output, again.output

    unknown = CliRunner().invoke(main, ["load", "demo_zed", *broker])
    assert unknown.exit_code == 1 and unknown.output.startswith("Error: unknown_model: "), unknown.output
    assert "configured: " + ", ".join(models) in unknown.output

    stats = CliRunner().invoke(main, ["stats", "demo_zed", "--once", "--json", "--broker-stats", cfg.stats_endpoint,
                                      *broker, "--timeout", "5"])
    assert stats.exit_code == 1 and "'demo_zed' is not in the broker's catalog" in stats.output, stats.output
    assert stats.stdout == ""

    failing = CliRunner().invoke(main, ["loadtest", "--models", "demo_zed", "-n", "2", "-c", "1", "--quiet", *broker])
    assert failing.exit_code == 1
    assert "no request succeeded (unknown_model: model 'demo_zed' is not configured" in failing.stderr, failing.output


@pytest.mark.processes
def test_start_banner_commands_work_as_pasted_outside_the_venv(demo_dir, tmp_path):
    import signal

    from conftest import cluster_config

    config = cluster_config(demo_dir, tmp_path, cluster={"per_gpu": 1})
    cli = Path(sys.executable).parent / "lipsync-cluster"
    proc = subprocess.Popen([str(cli), "start", "--config", str(config), "--gpus", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_no_venv_env(), cwd=ROOT)
    try:
        lines: list[str] = []
        for line in proc.stdout:  # the banner ends with its second rule; a failed start ends stdout
            lines.append(line.rstrip("\n"))
            if len(lines) > 1 and line.startswith("=" * 72):
                break
        tried = [line.split("try:", 1)[1] if "try:" in line else line for line in lines
                 if "try:" in line or "-c \"from lipsync_cluster.client" in line]
        assert len(tried) == 2, lines
        outs = [subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60,
                               env=_no_venv_env(), cwd=ROOT) for command in tried]
        assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
        assert "demo_ada" in outs[0].stdout and "'ready': True" in outs[1].stdout, [o.stdout for o in outs]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        proc.stdout.close()
