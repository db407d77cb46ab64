"""The gateway's page in a real browser: Debian's chromium, headless, driven by Playwright.

The microphone is Chromium's fake capture device fed from a WAV of speech-like bursts; the page
resamples it to 16 kHz in its AudioWorklet and streams it. Checked: the page lists the models,
connects, frames arrive and are drawn (pixels read back from the canvas match the model's
background), switching the model while audio flows changes the drawn background at the frame the
gateway announced, listening keeps frames coming from the workers' idle cache without sending the
microphone, and an interrupt gives frames that go on from the cut.

Needs `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the
system browser is used). Without them the test is skipped and says why.
"""
from __future__ import annotations

import asyncio
import base64
import os
import shutil
import threading
import wave

import cv2
import numpy as np
import pytest

from conftest import free_port

pytestmark = pytest.mark.processes  # chromium, and a cluster

CHROMIUM = os.environ.get("LSC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"browser test skipped: the 'playwright' package is not installed ({exc}); "
                    "pip install playwright")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"browser test skipped: no chromium at {CHROMIUM}; apt-get install -y chromium "
                    "(or set LSC_CHROMIUM to a Chromium binary)")


def write_speech_wav(path, seconds: float = 6.0, rate: int = 48000) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    env = (np.sin(2 * np.pi * 1.0 * t) > -0.3).astype(np.float64)
    x = 0.3 * env * (voiced / 3 + 0.2 * rng.standard_normal(t.size))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())


class GatewayThread:
    """The gateway on its own event loop in a thread (Playwright's sync API owns the main thread)."""

    def __init__(self, broker: str, **settings) -> None:
        self.broker = broker
        self.settings = settings
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error = None

    def _run(self) -> None:
        from aiohttp import web

        from lipsync_cluster.gateway.server import make_app

        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(make_app(self.broker, **self.settings))
        try:
            self.loop.run_until_complete(runner.setup())
            self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        except Exception as exc:  # noqa: BLE001
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> "GatewayThread":
        self._thread.start()
        self._ready.wait(30)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


SNAPSHOT_JS = """() => {
  const c = document.getElementById('view');
  return {png: c.toDataURL('image/png'), last: window.lsc.lastDrawn, drawn: window.lsc.framesDrawn,
          level: window.lsc.maxLevel, sent: window.lsc.samplesSent, errors: window.lsc.errors, w: c.width, h: c.height};
}"""


def snapshot(page) -> tuple[np.ndarray, dict]:
    snap = page.evaluate(SNAPSHOT_JS)
    data = base64.b64decode(snap["png"].split(",", 1)[1])
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return image, snap


def background_distance(image: np.ndarray, demo_dir, model_id: str, index: int) -> float:
    """Mean |canvas - background| on the top band of the frame (far from the face box)."""
    bg = cv2.imread(str(demo_dir / model_id / "frames" / f"frame_{index:04d}.jpg"))
    return float(np.abs(image[:150].astype(np.int16) - bg[:150]).mean())


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]


def test_page_streams_the_microphone_and_switches_models(make_cluster, demo_dir, tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    sup = make_cluster()
    wav = tmp_path / "speech.wav"
    write_speech_wav(wav)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"]
    console: list[str] = []
    with GatewayThread(sup.config.frontend) as gw, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(gw.url + "?transport=ws")  # the JPEG WebSocket (WebRTC, the default: tests/test_webrtc.py)
            page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=15000)
            assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == \
                ["demo_ada", "demo_ben", "demo_cleo"]
            page.select_option("#model", "demo_ada")
            page.click("#connect")
            page.wait_for_function("window.lsc.started === true", timeout=15000)
            page.click("#mic")
            page.wait_for_function("window.lsc.micOn === true", timeout=15000)
            page.wait_for_function("window.lsc.framesDrawn >= 40", timeout=30000)

            image, snap = snapshot(page)
            last = snap["last"]
            assert snap["errors"] == [], snap["errors"]
            assert snap["level"] > 0.02, "the level meter saw the microphone's bursts"
            assert snap["sent"] >= 40 * 640, "16 kHz PCM went out: at least the audio of the frames drawn"
            assert (snap["w"], snap["h"]) == (1280, 720) and image.shape == (720, 1280, 3)
            assert last["model_id"] == "demo_ada"
            own = background_distance(image, demo_dir, "demo_ada", last["background_index"])
            other = background_distance(image, demo_dir, "demo_ben", last["background_index"])
            assert own < 6 and other > 15, f"the canvas shows demo_ada's frame ({own:.1f} vs {other:.1f})"
            t0, s0 = page.evaluate("[performance.now(), window.lsc.samplesSent]")
            page.wait_for_timeout(1000)
            t1, s1 = page.evaluate("[performance.now(), window.lsc.samplesSent]")
            rate = (s1 - s0) / ((t1 - t0) / 1000)
            assert 16000 * 0.85 < rate < 16000 * 1.15, f"the AudioWorklet sends 16 kHz PCM, measured {rate:.0f} Hz"
            if os.environ.get("LSC_SCREENSHOT"):
                page.screenshot(path=os.environ["LSC_SCREENSHOT"])
            fps = float(page.inner_text("#fps"))
            # 25 on an idle machine; this only checks the counter runs (a loaded CI box draws fewer)
            assert fps > 0, f"the page counts the frames it draws per second, got {fps}"

            # switch while the microphone keeps streaming
            drawn_before = snap["drawn"]
            page.select_option("#model", "demo_ben")
            page.wait_for_function("window.lsc.lastDrawn && window.lsc.lastDrawn.model_id === 'demo_ben'",
                                   timeout=15000)
            page.wait_for_timeout(200)
            image, snap = snapshot(page)
            last = snap["last"]
            assert last["model_id"] == "demo_ben" and snap["drawn"] > drawn_before
            own = background_distance(image, demo_dir, "demo_ben", last["background_index"])
            other = background_distance(image, demo_dir, "demo_ada", last["background_index"])
            assert own < 6 and other > 15, f"the canvas shows demo_ben's frame now ({own:.1f} vs {other:.1f})"
            stats = page.evaluate("window.lsc.lastStats")
            assert stats and stats["model_id"] == "demo_ben" and stats["latency"]["p99_ms"] is not None
            latency_text = page.inner_text("#latency")
            assert "/" in latency_text, f"the page shows its measured latency, got {latency_text!r}"

            # the switch landed where the gateway said: the first demo_ben frame is at that position
            (switch,) = page.evaluate("window.lsc.switches")
            runs = page.evaluate("window.lsc.runs")
            assert [m for _, m in runs] == ["demo_ada", "demo_ben"], runs
            if page.evaluate("window.lsc.serverDrops") == 0:
                assert runs[1][0] == switch["at_frame"], (runs, switch)
            assert runs[1][0] >= switch["at_frame"] > 0

            # listening: the microphone is not sent, idle frames (served without the UNet) keep coming
            page.click("#listen")
            page.wait_for_function("window.lsc.lastStats && window.lsc.lastStats.listening === true "
                                   "&& window.lsc.lastStats.idle_frames > 0", timeout=30000)
            sent = page.evaluate("window.lsc.samplesSent")
            drawn = page.evaluate("window.lsc.framesDrawn")
            page.wait_for_function(f"window.lsc.framesDrawn > {drawn + 10}", timeout=15000)
            assert page.evaluate("window.lsc.samplesSent") == sent, "no microphone audio while listening"

            # talk again, then barge in: frames go on from the cut, in sequence
            page.click("#listen")
            page.wait_for_function("window.lsc.lastStats && window.lsc.lastStats.listening === false", timeout=15000)
            page.click("#interrupt")
            page.wait_for_function("window.lsc.cuts.length === 1", timeout=15000)
            cut = page.evaluate("window.lsc.cuts[0]")
            page.wait_for_function(f"window.lsc.lastIndex > {cut + 10}", timeout=15000)
            state = page.evaluate("({gaps: window.lsc.indexGaps, drops: window.lsc.serverDrops, "
                                  "errors: window.lsc.errors, stats: window.lsc.lastStats})")
            assert state["errors"] == [], state["errors"]
            assert state["gaps"] == 0 or state["drops"] > 0, f"frame indices go on from the cut: {state}"
            page.wait_for_function(f"window.lsc.lastStats.interrupts.includes({cut})", timeout=5000)
        finally:
            browser.close()
    assert not [c for c in console if c.startswith("pageerror")], console
