"""WebRTC out of the gateway against a real cluster: a Python aiortc peer offers, receives both tracks.

Real sockets (HTTP offer, ICE/DTLS/SRTP on loopback, SCTP data channel), real encoders (libx264 /
libvpx, Opus) and decoders. The gateway stamps each picture with its frame index
(``webrtc_stamp``), so the receiver reads which frame it got after the codec. The demo models are
the `light` ones at 640x360 (a quarter of the pixels of the shared fixture's: the test machine's
two cores also run the cluster and the receiver's decoders).

Checks that depend on the network are exact when the receiver's RTCP statistics count no lost
packet, and say so when a starved loopback lost some.
"""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")
from aiohttp import ClientSession  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from lipsync_cluster.gateway.server import GATEWAY_KEY, make_app  # noqa: E402
from lipsync_cluster.gateway.webrtc import read_stamp, stamp_index  # noqa: E402
from lipsync_cluster.client import Client  # noqa: E402
from lipsync_cluster.gateway.webrtc_viewer import Viewer  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, GatewayThread, _browser_or_skip, write_speech_wav  # noqa: E402

SR = 16000


def speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(SR * seconds))) / SR
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    x = 0.3 * (voiced / 3 + 0.2 * rng.standard_normal(t.size))
    return np.round(x * 32767).astype("<i2")


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from lipsync_cluster.demo.build import build_demo_models

    out = tmp_path_factory.mktemp("demo_small")
    build_demo_models(out, count=3, kind="light", frames=12, size=(640, 360), seed=0, progress=False)
    return out


@pytest.fixture
def cluster(small_demo, tmp_path):
    from conftest import cluster_config
    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    cfg = load_config(cluster_config(small_demo, tmp_path))
    sup = Supervisor(cfg, cfg.cluster.gpus, cfg.cluster.per_gpu)
    sup.start()
    try:
        sup.wait_ready(timeout_s=120)
        sup.watch_in_background()
        yield sup
    finally:
        sup.stop(drain_timeout_s=10)


def backgrounds(demo_dir, model_id):
    return [cv2.imread(str(p)) for p in sorted((demo_dir / model_id / "frames").glob("frame_*.jpg"))]


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_catch_up_may_pass_over_listening_silence_and_quiet_pushed_audio_only():
    """A page streams its microphone all the time: its pauses are pushed audio. The player's
    catch-up (after a stall) may pass those over, as it does idle frames, but never speech."""
    from lipsync_cluster.client.av import AVFrame
    from lipsync_cluster.gateway.webrtc import QUIET_PEAK, _silent

    def pair(audio: np.ndarray, speech: bool = True) -> AVFrame:
        return AVFrame(index=0, pts=0.0, frame=None, audio=audio, sample_rate=16000, sample_offset=0,
                       speech=speech, segment_ends=0)

    quiet = np.full(640, int(QUIET_PEAK * 32768) - 1, np.int16)
    quiet[::2] *= -1
    assert _silent(pair(np.zeros(640, np.int16)))  # a fake mic's digital silence, pushed
    assert _silent(pair(quiet))  # a real mic's noise floor
    assert _silent(pair(np.full(640, 20000, np.int16), speech=False))  # listening silence, whatever it holds
    loud = quiet.copy()
    loud[300] = 2000  # one sample of speech is enough to keep the frame
    assert not _silent(pair(loud))
    assert not _silent(pair(np.full(640, 0.02, np.float32)))  # float32 audio: full scale 1
    assert _silent(pair(np.full(640, 0.005, np.float32)))


def test_webrtc_batching_is_adaptive_by_default_and_checked():
    assert make_app("tcp://127.0.0.1:1")[GATEWAY_KEY].webrtc_batching == "adaptive"  # conversation
    assert make_app("tcp://127.0.0.1:1", webrtc_batching="fixed")[GATEWAY_KEY].webrtc_batching == "fixed"
    with pytest.raises(ValueError, match="webrtc_batching must be one of adaptive, fixed"):
        make_app("tcp://127.0.0.1:1", webrtc_batching="grid")


def test_stamp_survives_h264_and_reads_back():
    import av

    rng = np.random.default_rng(0)
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.bit_rate = 1280, 720, "yuv420p", 300_000
    ctx.time_base = __import__("fractions").Fraction(1, 25)
    dec = av.CodecContext.create("h264", "r")
    got = []
    for i, index in enumerate((0, 1, 2, 1000, 654321, (1 << 20) - 1)):
        img = rng.integers(0, 255, (720, 1280, 3), np.uint8)
        frame = av.VideoFrame.from_ndarray(stamp_index(img, index), format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        for packet in ctx.encode(frame):
            for out in dec.decode(packet):
                got.append(read_stamp(out.to_ndarray(format="gray")))
    for packet in [*ctx.encode(None), None]:  # flush the encoder, then the decoder
        for out in dec.decode(packet):
            got.append(read_stamp(out.to_ndarray(format="gray")))
    assert got == [0, 1, 2, 1000, 654321, (1 << 20) - 1], "noise around the stamp at a low bit rate"


def _check_tracks(viewer: Viewer, status: dict, lost: dict) -> list[int]:
    """What every call must satisfy. Pictures: stamped indices go up, and one by one except where
    the gateway skipped video ticks (its encoder behind real time) or passed idle frames over to
    catch up (it says how many of each) or the network lost packets. Audio: 20 ms packets, 1920 samples per tick, in order, each once, none missing
    unless lost; both tracks cover the same ticks."""
    assert not viewer.errors, viewer.errors
    indices = viewer.indices()
    assert indices[0] == 0, "the first picture is frame 0"
    assert all(b > a for a, b in zip(indices, indices[1:])), "frames in order"
    gaps = sum(b - a - 1 for a, b in zip(indices, indices[1:]))
    if lost["video"] == 0:
        assert gaps <= status["video_skipped"] + status["caught_up"], (gaps, status, indices)
    assert all(a[2] == 960 for a in viewer.audio), "20 ms Opus frames"
    pts = [a[1] for a in viewer.audio]
    assert all(p % 960 == 0 for p in pts) and all(b > a for a, b in zip(pts, pts[1:])), "in order, once"
    missing = (pts[-1] - pts[0]) // 960 + 1 - len(pts)
    assert missing <= lost["audio"], (missing, lost)
    # the two tracks cover the same ticks, up to what is in flight when the call ends (the last
    # ticks' pictures in the encoder and decoder, their audio in the receiver's jitter buffer)
    v_ticks = (viewer.video[-1][1] - viewer.video[0][1]) / 3600 + 1
    a_ticks = (pts[-1] - pts[0]) / 1920 + 0.5
    assert v_ticks - 5 <= a_ticks <= v_ticks + 25, (a_ticks, v_ticks)
    return indices


@pytest.mark.processes
def test_call_with_speech_switch_and_interrupt(cluster, small_demo):
    """Both tracks, continuous indices, 40 ms of audio per frame; switch and interrupt mid-call."""
    sup = cluster
    bg = {m: backgrounds(small_demo, m) for m in ("demo_ada", "demo_ben")}

    async def run():
        server = TestServer(make_app(sup.config.frontend, webrtc_stamp=True, lookahead_frames=4))
        await server.start_server()
        gateway = server.app[GATEWAY_KEY]
        viewer = Viewer(str(server.make_url("")), "demo_ada", lookahead_frames=4, keep_audio=True,
                        keep_every=3)
        pusher = None
        try:
            answer = await viewer.connect()
            assert answer["video_codec"] == "h264", "H.264 preferred"
            hello = await viewer.wait_message("hello")
            assert hello["model_id"] == "demo_ada" and hello["sample_rate"] == 16000
            await viewer.wait_frames(10)  # idle frames flow before anyone speaks (listening)

            async def talk():  # a microphone: 100 ms messages in real time
                pcm = speech(30.0, 1)
                for i in range(0, pcm.size, 1600):
                    viewer.push(pcm[i:i + 1600])
                    await asyncio.sleep(0.1)

            pusher = asyncio.ensure_future(talk())
            await until(lambda: viewer.indices()[-1] >= 40, 60, "frame 40")
            viewer.control({"type": "switch", "model_id": "demo_ben"})
            switched = await viewer.wait_message("switched")
            await until(lambda: viewer.indices()[-1] >= switched["at_frame"] + 15, 60, "frames after the switch")
            pusher.cancel()  # the user stops talking and barges in
            viewer.control({"type": "interrupt"})
            interrupted = await viewer.wait_message("interrupted")
            cut = interrupted["cut"]
            await until(lambda: viewer.indices()[-1] >= cut + 30, 60, "frames after the cut")
            await viewer.wait_audio_covers_video()
            status = (await _status(server))["detail"][0]
            lost = await viewer.packets_lost()
            await viewer.close()
            await until(lambda: not gateway.sessions, 30, "the session to end")
            return viewer, switched, cut, status, lost
        finally:
            if pusher is not None:
                pusher.cancel()
            await viewer.close()
            await server.close()

    viewer, switched, cut, status, lost = asyncio.run(run())
    assert status["transport"] == "webrtc" and status["codec"] == "h264"
    indices = _check_tracks(viewer, status, lost)
    assert indices[-1] >= cut + 30
    # the audio of each tick: the speech pushed before the switch is heard before its frame; after
    # the cut only the listening silence (the talker stopped, what was queued was dropped)
    audio = np.concatenate(viewer.audio_pcm).astype(np.float64)
    a0 = viewer.audio[0][1]
    level: dict[int, float] = {}  # tick -> rms
    for (_, p, n), chunk in zip(viewer.audio, viewer.audio_pcm):
        t = (p - a0) // 1920
        level[t] = max(level.get(t, 0.0), float(np.sqrt(np.mean(chunk.astype(np.float64) ** 2))))
    tick_of = {idx: (p - viewer.video[0][1]) // 3600 for _, p, idx in viewer.video}
    before = [level.get(t, 0.0) for i, t in tick_of.items() if i < switched["at_frame"]]
    after = [level.get(t, 0.0) for i, t in tick_of.items() if i >= cut + 5]
    assert before and after and audio.size
    assert max(before) > 1000, "speech was heard"
    assert max(after) < 50, ("silence after the cut", cut, sorted((i, level.get(t)) for i, t in tick_of.items()))
    # the switch lands where announced: demo_ben's background from at_frame on
    assert switched["at_frame"] < cut
    checked = 0
    for index, image in sorted(viewer.kept.items()):
        model = "demo_ben" if index >= switched["at_frame"] else "demo_ada"
        other = "demo_ada" if model == "demo_ben" else "demo_ben"
        own = min(np.abs(image.astype(int) - b[:120]).mean() for b in bg[model])
        theirs = min(np.abs(image.astype(int) - b[:120]).mean() for b in bg[other])
        assert own < theirs, (index, model, own, theirs)
        checked += 1
    assert checked >= 10


@pytest.mark.processes
def test_a_talker_that_pauses_keeps_the_timeline_on_the_wall_clock(cluster):
    """Issue 19: a viewer that talks in real time and sends nothing while silent (100 ms messages,
    pauses of 200 ms) must leave the session's timeline where the wall clock is, or the player (one
    frame per 40 ms) runs out of frames: fillers at the speech onsets. Each pause used to cost the
    timeline the grace less a message plus up to a frame, for good. Checked on the gateway's own
    session (real sockets, encoders, cluster): during the last pause, once the listening silence has
    been topped up, the timeline's end is less than a frame behind the wall clock (counted from
    before the session was made, so the check can only err toward "behind")."""
    sup = cluster

    async def run():
        server = TestServer(make_app(sup.config.frontend, lookahead_frames=4))
        await server.start_server()
        gateway = server.app[GATEWAY_KEY]
        viewer = Viewer(str(server.make_url("")), "demo_ada", lookahead_frames=4, read_index=False)
        try:
            await viewer.connect()
            peer = next(iter(gateway.sessions.values()))
            core = peer.stream.core
            await until(lambda: len(viewer.video) >= 10, 60, "idle frames")
            pcm = speech(4.0, 3)
            t0 = time.monotonic()
            for k in range(12):  # 300 ms of speech, 200 ms of nothing, in real time
                for j in range(3):
                    delay = t0 + (5 * k + j) * 0.1 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    viewer.push(pcm[(3 * k + j) * 1600:(3 * k + j + 1) * 1600])
            await asyncio.sleep(max(0.0, t0 + 60 * 0.1 - time.monotonic()) + 0.3)  # the last pause, past the grace
            behind = []
            for _ in range(50):  # the silence is topped up once per tick: the smallest lag is just after one
                behind.append(time.time() - peer.started_at - core.n / core.rate)
                await asyncio.sleep(0.02)
            status = (await _status(server))["detail"][0]
            return min(behind), core, status
        finally:
            await viewer.close()
            await server.close()

    behind, core, status = asyncio.run(run())
    assert core.n > 3 * 16000, "the speech and the pauses made a timeline"
    assert behind < 0.1, (f"the timeline is {behind * 1000:.0f} ms behind the wall clock after 12 pauses: the player "
                          f"fills that with repeated pictures", status["fillers"], status["filler_log"][-5:])


async def _status(server) -> dict:
    async with ClientSession() as http:
        return await (await http.get(server.make_url("/api/status"))).json()


@pytest.mark.processes
def test_vp8_when_the_offer_has_no_h264(cluster):
    sup = cluster

    async def run():
        server = TestServer(make_app(sup.config.frontend, webrtc_stamp=True))
        await server.start_server()
        viewer = Viewer(str(server.make_url("")), "demo_cleo", codecs=("vp8",))
        try:
            answer = await viewer.connect()
            await viewer.wait_frames(15, 90)
            await viewer.wait_audio_covers_video()
            status = (await _status(server))["detail"][0]
            return answer, viewer, status, await viewer.packets_lost()
        finally:
            await viewer.close()
            await server.close()

    answer, viewer, status, lost = asyncio.run(run())
    assert answer["video_codec"] == "vp8" and status["codec"] == "vp8"
    _check_tracks(viewer, status, lost)


@pytest.mark.processes
def test_bad_offers_get_a_clear_400_and_the_gateway_keeps_serving(cluster):
    sup = cluster

    async def run():
        server = TestServer(make_app(sup.config.frontend))
        await server.start_server()
        url = server.make_url("/webrtc/offer")
        out = {}
        try:
            async with ClientSession() as http:
                async def post(body, **kw):
                    async with http.post(url, data=body if isinstance(body, (bytes, str)) else json.dumps(body),
                                         **kw) as r:
                        return r.status, await r.json()

                out["not json"] = await post(b"{nope")
                out["not sdp"] = await post({"type": "offer", "sdp": "hello", "model": "demo_ada"})
                out["bad sdp"] = await post({"type": "offer", "sdp": "v=0\r\nm=garbage\r\n", "model": "demo_ada"})
                out["answer"] = await post({"type": "answer", "sdp": "v=0", "model": "demo_ada"})
                out["no model"] = await post({"type": "offer", "sdp": "v=0"})
                out["unknown"] = await post({"type": "offer", "sdp": "v=0", "model": "demo_zed"})
                out["lookahead"] = await post({"type": "offer", "sdp": "v=0", "model": "demo_ada",
                                               "lookahead_frames": 99})
                out["too big"] = await post({"type": "offer", "sdp": "v=0" + "x" * 70000, "model": "demo_ada"})
                out["origin"] = await post({"type": "offer", "sdp": "v=0", "model": "demo_ada"},
                                           headers={"Origin": "https://evil.example"})
            # an offer with no video to receive (a data channel only)
            from aiortc import RTCPeerConnection
            pc = RTCPeerConnection()
            pc.createDataChannel("control")
            await pc.setLocalDescription(await pc.createOffer())
            async with ClientSession() as http:
                async with http.post(url, json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                "model": "demo_ada"}) as r:
                    out["no video"] = (r.status, await r.json())
            await pc.close()
            out["sessions"] = len(server.app[GATEWAY_KEY].sessions)
            # and a good offer still works
            viewer = Viewer(str(server.make_url("")), "demo_ada", read_index=False)
            await viewer.connect()
            await viewer.wait_frames(5, 90)
            await viewer.close()
            return out
        finally:
            await server.close()

    out = asyncio.run(run())
    msg = {k: v[1]["error"]["message"] for k, v in out.items() if isinstance(v, tuple)}
    assert out["not json"][0] == 400 and "not JSON" in msg["not json"]
    assert out["not sdp"][0] == 400 and "sdp" in msg["not sdp"]
    assert out["bad sdp"][0] == 400 and "SDP" in msg["bad sdp"], msg["bad sdp"]
    assert out["answer"][0] == 400 and "type must be 'offer'" in msg["answer"]
    assert out["no model"][0] == 400 and "model_id must match" in msg["no model"]
    assert out["unknown"][0] == 404 and out["unknown"][1]["error"]["code"] == "unknown_model"
    assert "demo_zed" in msg["unknown"] and "demo_ada" in msg["unknown"], "names the model and the choices"
    assert out["lookahead"][0] == 400 and "lookahead_frames" in msg["lookahead"]
    assert out["too big"][0] == 413 and "65536" in msg["too big"]
    assert out["origin"][0] == 403
    assert out["no video"][0] == 400 and "no video" in msg["no video"], msg["no video"]
    assert out["sessions"] == 0, "a refused offer leaves no session"


VANISHING_PEER = textwrap.dedent("""
    import asyncio, sys
    from lipsync_cluster.gateway.webrtc_viewer import Viewer
    async def main():
        v = Viewer(sys.argv[1], "demo_ben", read_index=False)
        await v.connect()
        await v.wait_frames(10, 90)
        print("receiving", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


@pytest.mark.processes
def test_a_peer_that_closes_or_vanishes_frees_its_session(cluster):
    """A peer that closes (DTLS/SCTP goodbye) and one killed mid-call (no goodbye: no more RTCP
    reports) both end their StreamSession: the gateway's session count goes back to 0, and the
    broker, which knows requests rather than sessions, sees none left behind: nothing queued or
    in flight and no new request once the sessions have ended."""
    sup = cluster

    async def run():
        server = TestServer(make_app(sup.config.frontend, webrtc_peer_timeout_s=3.0))
        await server.start_server()
        gateway = server.app[GATEWAY_KEY]
        base = str(server.make_url(""))
        proc = None
        try:
            viewer = Viewer(base, "demo_ada", read_index=False)
            await viewer.connect()
            await viewer.wait_frames(10, 90)
            (peer,) = gateway.sessions.values()
            viewer.push(speech(2.0, 4))
            await viewer.close()
            await until(lambda: not gateway.sessions, 30, "the closed peer's session to end")
            closed = (peer.reason, peer.stream.session._cancelled, len(peer.stream.session._tasks))

            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", VANISHING_PEER, base,
                                                        stdout=subprocess.PIPE)
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert line.strip() == b"receiving", line
            (peer,) = gateway.sessions.values()
            proc.kill()  # no goodbye at all
            await proc.wait()
            t = time.monotonic()
            await until(lambda: not gateway.sessions, 30, "the vanished peer's session to end")
            vanished = (peer.reason, peer.stream.session._cancelled, time.monotonic() - t)
            status = await _status(server)
            return closed, vanished, status
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
            await server.close()

    closed, vanished, status = asyncio.run(run())
    assert closed[0].startswith("connection") and closed[1] and closed[2] == 0, closed
    assert vanished[1] and ("no report" in vanished[0] or "connection" in vanished[0]), vanished
    assert status["sessions"] == 0 and status["closed_sessions"] == 2
    _assert_broker_sees_no_session_left(sup.config.frontend)


def _assert_broker_sees_no_session_left(frontend: str) -> None:
    """What a leaked StreamSession would leave at the broker: requests queued or in flight, or
    requests still arriving after its peer has gone (one every 40-200 ms while it streams)."""
    with Client(frontend, timeout=10) as client:
        def snapshot():
            s = client.model_stats()
            return s["queued"], sum(w["in_flight"] for w in s["workers"]), s["totals"]["requests"]
        first = snapshot()
        deadline = time.monotonic() + 10  # a request already sent when the session ended drains
        while first[:2] != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
            first = snapshot()
        time.sleep(1.0)  # five idle-frame requests' worth: a live session would have sent some
        second = snapshot()
    assert first[:2] == (0, 0) and second == first, (first, second)


# Reads the gateway's frame-index stamp (gateway/webrtc.py stamp_index: 20 blocks of 16 px along the
# bottom-left edge) off every frame the <video> presents, with its RTP timestamp.
STAMPS_JS = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  const g = c.getContext('2d', {willReadFrequently: true});
  window.stamps = [];
  const onFrame = (now, meta) => {
    c.width = meta.width; c.height = meta.height;
    g.drawImage(v, 0, 0);
    const y0 = (Math.floor(meta.height / 16) - 1) * 16;
    const d = g.getImageData(0, y0, 320, 16).data;
    let index = 0;
    for (let b = 0; b < 20; b++) {
      let sum = 0, n = 0;
      for (let y = 4; y < 12; y++) for (let x = b * 16 + 4; x < b * 16 + 12; x++) {
        const i = (y * 320 + x) * 4; sum += (d[i] + d[i + 1] + d[i + 2]) / 3; n++;
      }
      if (sum / n > 128) index |= (1 << b);
    }
    window.stamps.push([index, meta.rtpTimestamp]);
    v.requestVideoFrameCallback(onFrame);
  };
  v.requestVideoFrameCallback(onFrame);
}"""

VIDEO_PNG_JS = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext('2d').drawImage(v, 0, 0);
  return c.toDataURL('image/png');
}"""

RTC_STATS_JS = """async () => {
  const out = {};
  (await window.lsc.pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp') out[s.kind] = s;
  });
  return out;
}"""


def _video_image(page) -> np.ndarray:
    data = base64.b64decode(page.evaluate(VIDEO_PNG_JS).split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _nearest_background(image: np.ndarray, small_demo, model_id: str) -> float:
    return min(float(np.abs(image[:150].astype(np.int16) - cv2.imread(str(p))[:150]).mean())
               for p in sorted((small_demo / model_id / "frames").glob("frame_*.jpg")))


def _gateway_status(url: str) -> dict:  # the gateway runs in a thread: ask it over HTTP
    import json
    import urllib.request

    with urllib.request.urlopen(url + "api/status", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.processes
def test_page_plays_the_avatar_over_webrtc_in_chromium(cluster, small_demo, tmp_path):
    """The page's default: WebRTC. Chromium receives H.264 and Opus through /webrtc/offer, its
    microphone goes out on the data channel, the switch and the interrupt work mid-call, and
    disconnecting ends the gateway's session."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    sup = cluster
    wav = tmp_path / "speech.wav"
    write_speech_wav(wav)
    args = CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={wav}"]
    console: list[str] = []
    with GatewayThread(sup.config.frontend, webrtc_stamp=True) as gw, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(gw.url + "?lookahead=4")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=15000)
            page.select_option("#model", "demo_ada")
            page.click("#connect")
            page.wait_for_function("window.lsc.started === true", timeout=30000)
            assert page.evaluate("window.lsc.transport") == "webrtc", page.evaluate("window.lsc.messages")
            page.evaluate(STAMPS_JS)
            page.click("#mic")
            page.wait_for_function("window.lsc.micOn === true", timeout=15000)
            page.wait_for_function("window.stamps.length >= 50", timeout=60000)
            image = _video_image(page)
            assert image.shape == (360, 640, 3)
            own, other = _nearest_background(image, small_demo, "demo_ada"), _nearest_background(image, small_demo, "demo_ben")
            assert own < other, f"the video shows demo_ada ({own:.1f} vs {other:.1f})"

            page.select_option("#model", "demo_ben")
            page.wait_for_function("window.lsc.switches.length === 1", timeout=15000)
            at = page.evaluate("window.lsc.switches[0].at_frame")
            page.wait_for_function(f"window.stamps.length && window.stamps[window.stamps.length - 1][0] > {at + 10}",
                                   timeout=60000)
            image = _video_image(page)
            own, other = _nearest_background(image, small_demo, "demo_ben"), _nearest_background(image, small_demo, "demo_ada")
            assert own < other, f"the video shows demo_ben after the switch ({own:.1f} vs {other:.1f})"

            page.click("#interrupt")
            page.wait_for_function("window.lsc.cuts.length === 1", timeout=15000)
            cut = page.evaluate("window.lsc.cuts[0]")
            page.wait_for_function(f"window.stamps[window.stamps.length - 1][0] > {cut + 25}", timeout=60000)
            stamps = page.evaluate("window.stamps")
            rtc = page.evaluate(RTC_STATS_JS)
            status = _gateway_status(gw.url)["detail"][0]
            errors = page.evaluate("window.lsc.errors")

            page.click("#connect")  # disconnect: the gateway's session ends
            deadline = time.monotonic() + 30
            while _gateway_status(gw.url)["sessions"] and time.monotonic() < deadline:
                time.sleep(0.1)
            after = _gateway_status(gw.url)
        finally:
            browser.close()
    assert errors == [], errors
    assert not [c for c in console if c.startswith("pageerror")], console
    indices = [i for i, _ in stamps]
    assert all(b >= a for a, b in zip(indices, indices[1:])), "presented in order"
    # H.264 when the browser offers it (Debian's Chromium does not: VP8, the fallback)
    assert status["transport"] == "webrtc" and status["codec"] in ("h264", "vp8")
    video, audio = rtc["video"], rtc["audio"]
    # every picture sent arrived (the browser presents fewer when it is busy: those are not losses)
    if video.get("packetsLost", 0) == 0:
        assert video["framesReceived"] >= status["sent"] - status["video_skipped"] - 25, (video, status)
    # the voice: 48 kHz, 1920 samples per picture tick (up to what is in flight)
    ticks = audio["totalSamplesReceived"] / 1920
    assert abs(ticks - status["sent"]) <= 25, (audio["totalSamplesReceived"], status["sent"])
    assert after["sessions"] == 0 and after["closed_sessions"] == 1, after
