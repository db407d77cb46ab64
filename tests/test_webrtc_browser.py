"""bench/webrtc_browser.py cannot rot: a short run of its measurement (Chromium, the page over WebRTC,
espeak-ng speech into the fake microphone) and its mechanics checked, not its timing.

Needs chromium and playwright (as tests/test_browser.py), espeak-ng (`make speech-deps`) and the
webrtc extra; each missing one skips the test and says why.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import _browser_or_skip

pytestmark = pytest.mark.processes  # a cluster, the gateway and chromium

ROOT = Path(__file__).resolve().parents[1]
UTTERANCES = 3


def test_speech_into_the_page_opens_the_mouth_on_its_screen(tmp_path):
    _browser_or_skip()
    pytest.importorskip("aiortc", reason="the webrtc extra (aiortc) is not installed")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng; `make speech-deps` installs it)")
    out = tmp_path / "result.json"
    # 640x360 (a quarter of the pixels: two shared cores also run the cluster and the decoder), and
    # 2 s between sentences so that the last picture of one is shown before the next one starts
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "webrtc_browser.py"), "--utterances",
                          str(UTTERANCES), "--gap", "2", "--size", "640x360", "--no-write", "--json", str(out)],
                         check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == [] and r["page_errors"] == [], (r["errors"], r["page_errors"])
    assert r["codec"] in ("h264", "vp8")
    # every sentence's onset reached the page's audio graph, and came back in the avatar's voice
    assert r["onsets"] == UTTERANCES, r["per_onset"]
    assert r["echo_onsets"] >= UTTERANCES, r["echo_onsets"]
    # the WAV's onsets and the page's are the same sentences: the same spacing, within 0.1 s (a busy
    # main thread stamps late)
    page = [row["onset_ms"] for row in r["per_onset"]]
    wav = [1000 * t for t in r["wav_onsets_s"]]
    for (p0, p1), (w0, w1) in zip(itertools.pairwise(page), itertools.pairwise(wav)):
        assert abs((p1 - p0) - (w1 - w0)) < 100, (page, wav)
    # each sentence opened the mouth on screen, after its onset, and the mouth was seen closed too
    assert r["mouth_seen"] == UTTERANCES, r["per_onset"]
    assert all(row["latency_ms"] > 0 for row in r["per_onset"]), r["per_onset"]
    assert 0 < r["frames_open"] < r["frames_presented"], (r["frames_open"], r["frames_presented"])
    assert r["frames_decoded"] > 0 and r["frames_presented"] > 0
    assert r["p50_ms"] is not None, "at least one onset had the mouth closed before it"
