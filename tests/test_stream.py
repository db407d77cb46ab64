"""StreamSession end to end: a real broker + 2 CPU workers on the light demo models.

Audio goes in as a speech-like signal (voiced bursts and silences) in chunks of odd sizes; the
frames that come back are checked for count, pts, order, background, model, mouth opening, and
for bit-level agreement with a whole-clip computation. Plus: a switch mid-stream lands on a batch
boundary, a SIGKILLed worker costs no frame, and the retry / lookahead rules of the core.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync_cluster.client import AsyncClient, Client
from lipsync_cluster.client.stream import AsyncStreamSession, StreamCore, StreamSession, total_frames_for
from lipsync_cluster.common import imageops
from lipsync_cluster.common.audio import SAMPLES_PER_FRAME, SPAN_AFTER, features_from_pcm
from lipsync_cluster.common.errors import BadRequest, Unavailable, UnknownModel
from lipsync_cluster.common.protocol import read_arrays
from lipsync_cluster.demo.light import mouth_open_pixels

SR = 16000
FPS = 25
MODEL_A, MODEL_B, MODEL_C = "demo_ada", "demo_ben", "demo_cleo"


def bursts(seconds: float, period: float = 1.6, on: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like signal: voiced bursts (harmonics + noise, syllable-rate wobble) then silence.

    Returns (pcm float32, envelope bool per sample). Bursts start at t = 0.4 + k * period.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(SR * seconds))) / SR
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    syllables = 0.6 + 0.4 * (np.sin(2 * np.pi * 4 * t) > -0.5)
    phase = (t - 0.4) % period
    env = (t >= 0.4) & (phase < on)
    pcm = 0.3 * env * syllables * (voiced / 3 + 0.2 * rng.standard_normal(t.size))
    return pcm.astype(np.float32), env


def frame_labels(env: np.ndarray, n_frames: int) -> tuple[list[int], list[int]]:
    """Frames whose mouth-driving audio (frame start - 50 ms .. + 250 ms) is all burst / all silence."""
    loud, quiet = [], []
    for k in range(n_frames):
        a = max(0, k * SAMPLES_PER_FRAME - 800)
        z = min(env.size, k * SAMPLES_PER_FRAME + 4000)
        if z <= a:
            continue
        seg = env[a:z]
        if seg.all():
            loud.append(k)
        elif not seg.any():
            quiet.append(k)
    return loud, quiet


def push_in_chunks(session, pcm: np.ndarray, seed: int = 1, pace: float = 0.0) -> None:
    """Push ``pcm`` in random chunk sizes (1 sample .. 0.3 s), alternating float32 and int16."""
    rng = np.random.default_rng(seed)
    i = 0
    while i < pcm.size:
        n = int(rng.choice([1, 7, 333, 640, 1999, 4800]))
        chunk = pcm[i:i + n]
        if rng.random() < 0.5:
            chunk = np.round(chunk * 32767).astype(np.int16)
        session.push(chunk)
        i += n
        if pace:
            time.sleep(n / SR / pace)


def mouth(frame) -> int:
    image = frame.decode()
    return mouth_open_pixels(imageops.crop_face(image, frame.rect)[4:324, 4:324])


def backgrounds(demo_dir: Path, model_id: str) -> list[np.ndarray]:
    files = sorted((demo_dir / model_id / "frames").glob("frame_*.jpg"))
    return [cv2.imread(str(p)) for p in files]


def outside_rect_diff(image: np.ndarray, background: np.ndarray, rect) -> float:
    x1, y1, x2, y2 = rect
    mask = np.ones(image.shape[:2], bool)
    mask[y1:y2, x1:x2] = False
    return float(np.abs(image[mask].astype(np.int16) - background[mask]).mean())


# --- the core, without a cluster --------------------------------------------------------------


def test_total_frames_is_round_seconds_times_fps():
    assert total_frames_for(0) == 0
    assert total_frames_for(319) == 0 and total_frames_for(321) == 1
    assert total_frames_for(640 * 100) == 100
    assert total_frames_for(640 * 100 + 319) == 100 and total_frames_for(640 * 100 + 321) == 101
    for seconds in (1.0, 3.37, 10.02, 10.06, 61.5, 0.02, 0.06):
        assert total_frames_for(int(round(seconds * SR))) == round(seconds * FPS)


def test_a_batch_waits_for_its_lookahead_then_the_tail_is_clamped():
    core = StreamCore(MODEL_A, batch_size=5, max_in_flight=100)
    need = (5 + SPAN_AFTER) * SAMPLES_PER_FRAME  # batch [0,5) needs audio up to frame 17
    core.push(np.zeros(need - 1, np.float32))
    assert core.plan() == []
    core.push(np.zeros(1, np.int16))
    (b,) = core.plan()
    assert (b.start, b.size, b.first, b.end) == (0, 5, 0, 17)
    pcm = read_arrays(b.header, b.payloads)["audio_pcm"]
    assert pcm.size == 17 * SAMPLES_PER_FRAME and b.header["audio_frame_offset"] == 0
    core.push(np.zeros(3 * SAMPLES_PER_FRAME + 100, np.float32))  # 20 frames + 100 samples in all
    assert core.plan() == []  # [5,10) needs 22 frames of audio: not yet
    core.close()
    assert core.total_frames == 20
    tail = core.plan()  # now the end is known: spans are clamped to it
    assert [(x.start, x.size, x.first, x.end) for x in tail] == [(5, 5, 0, 20), (10, 5, 1, 20), (15, 5, 6, 20)]
    assert read_arrays(tail[-1].header, tail[-1].payloads)["audio_pcm"].size == 14 * SAMPLES_PER_FRAME
    assert core.plan() == []


def test_adaptive_sends_what_its_lookahead_allows_while_nothing_is_in_flight():
    """Frame k needs audio to k + lookahead, not to its batch's last frame + lookahead: with
    ``adaptive`` the frames whose lookahead is in go at once while no batch is in flight, and
    what comes in during the round trip goes next, as one batch (up to batch_size)."""
    core = StreamCore(MODEL_A, batch_size=5, lookahead_frames=4, adaptive=True)
    fixed = StreamCore(MODEL_A, batch_size=5, lookahead_frames=4)
    for c in (core, fixed):
        c.push(np.zeros(5 * SAMPLES_PER_FRAME, np.float32))  # frames 0..4: frame 0 has its 4 of lookahead
    assert fixed.plan() == []  # the grid waits for frame 8's audio (batch [0,5) + 4)
    (b,) = core.plan()
    assert (b.start, b.size, b.first, b.end) == (0, 1, 0, 5)
    assert read_arrays(b.header, b.payloads)["audio_pcm"].size == 5 * SAMPLES_PER_FRAME
    core.sent(b)
    core.push(np.zeros(3 * SAMPLES_PER_FRAME, np.float32))  # frames 1..3 have their lookahead now
    assert core.plan() == []  # one in flight: the next waits for its reply (or a whole batch)
    reply = core.inflight[b.seq]
    del core.inflight[reply.seq]  # as completed() would (its frames are not the point here)
    (b2,) = core.plan()
    assert (b2.start, b2.size, b2.first, b2.end) == (1, 3, 0, 8)
    core.sent(b2)
    core.push(np.zeros(5 * SAMPLES_PER_FRAME, np.float32))  # 13 frames: [4, 9) is a whole batch
    (b3,) = core.plan()  # a whole batch goes even with one in flight, as on the grid
    assert (b3.start, b3.size, b3.end) == (4, 5, 13)
    with pytest.raises(BadRequest, match="lookahead_frames"):
        StreamCore(MODEL_A, lookahead_frames=13, adaptive=True)


def test_adaptive_batches_at_exact_lookahead_carry_the_exact_span():
    core = StreamCore(MODEL_A, batch_size=5, adaptive=True)  # lookahead 12 = exact
    core.push(np.zeros((2 + SPAN_AFTER) * SAMPLES_PER_FRAME, np.float32))
    (b,) = core.plan()
    assert (b.start, b.size, b.first, b.end) == (0, 2, 0, 2 + SPAN_AFTER)  # pcm_span_for_batch(0, 2)


def test_bad_arguments_are_refused_with_clear_messages():
    with pytest.raises(BadRequest, match="fps must be 25"):
        StreamCore(MODEL_A, fps=30)
    with pytest.raises(BadRequest, match="model_id"):
        StreamCore("../etc")
    core = StreamCore(MODEL_A)
    with pytest.raises(BadRequest, match="must lie in"):
        core.push(np.full(10, 3.0, np.float32))
    core.close()
    with pytest.raises(BadRequest, match="after close"):
        core.push(np.zeros(10, np.float32))


class FlakyClient:
    """A fake Client: fails the first try of every batch in ``fail_starts`` with ``error``."""

    def __init__(self, fail_starts=(), error=Unavailable, always=False):
        self.fail_starts, self.error, self.always = set(fail_starts), error, always
        self.calls: list[int] = []

    def submit(self, header, payloads=()):
        start, size = header["start_frame_idx"], header["batch_size"]
        self.calls.append(start)
        future: Future = Future()

        def answer():
            time.sleep(0.01)
            if not future.set_running_or_notify_cancel():
                return  # the session gave up on it
            if start in self.fail_starts and (self.always or self.calls.count(start) == 1):
                future.set_result(({"id": 1, "ok": False, "error": self.error("worker gone").to_wire()}, []))
                return
            images = [{"frame": i, "index": start + i, "background_index": 0, "rect": [0, 0, 1, 1]}
                      for i in range(size)]
            future.set_result(({"id": 1, "ok": True, "model_id": header["model_id"], "model_version": "v",
                                "format": "jpeg", "images": images, "timings": {"worker_ms": 1.0}},
                               [b"x"] * size))

        threading.Thread(target=answer, daemon=True).start()
        return future


def test_a_retryable_failure_is_retried_once_and_costs_no_frame():
    client = FlakyClient(fail_starts={10, 25})
    with StreamSession(client, MODEL_A, batch_size=5) as session:
        session.push(np.zeros(int(1.5 * SR), np.float32))
        session.close()
        frames = list(session.frames(timeout=10))
        assert [f.index for f in frames] == list(range(38))
        assert session.latency()["retries"] == 2
    assert client.calls.count(10) == 2 and client.calls.count(25) == 2


def test_a_second_failure_or_a_fatal_error_ends_the_session_with_that_error():
    with StreamSession(FlakyClient(fail_starts={5}, always=True), MODEL_A) as session:
        session.push(np.zeros(SR, np.float32))
        session.close()
        with pytest.raises(Unavailable, match="frames 5..9.*2 attempt"):
            list(session.frames(timeout=10))
    client = FlakyClient(fail_starts={0}, error=UnknownModel)
    with StreamSession(client, MODEL_A) as session:
        session.push(np.zeros(SR, np.float32))
        with pytest.raises(UnknownModel):
            list(session.frames(timeout=10))
    assert client.calls.count(0) == 1, "a non-retryable error is not retried"


# --- against a real cluster -------------------------------------------------------------------


@pytest.mark.processes
def test_stream_frames_exact_in_order_and_mouth_follows_the_bursts(make_cluster, demo_dir):
    sup = make_cluster()
    seconds = 6.37  # 159.25 frames -> 159
    pcm, env = bursts(seconds)
    with Client(sup.config.frontend) as client, StreamSession(client, MODEL_A, batch_size=5) as session:
        feeder = threading.Thread(target=lambda: (push_in_chunks(session, pcm, pace=4.0), session.close()))
        feeder.start()
        frames = list(session.frames(timeout=30))
        feeder.join()
        lat = session.latency()
    n = round(seconds * FPS)
    assert session.total_frames == n == 159
    assert len(frames) == n
    assert [f.index for f in frames] == list(range(n)), "frames in order, none missing or repeated"
    assert all(f.pts == f.index / FPS for f in frames), "pts is index / fps exactly: no drift"
    assert all(f.model_id == MODEL_A for f in frames)
    assert [f.background_index for f in frames] == [imageops.pingpong_index(k, 12) for k in range(n)]
    assert lat["frames"] == n and 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert set(lat["breakdown"]) >= {"lookahead_ms", "slot_wait_ms", "round_trip_ms", "reorder_ms"}

    loud, quiet = frame_labels(env, n)
    assert len(loud) > 20 and len(quiet) > 20
    opening = {k: mouth(frames[k]) for k in loud + quiet}
    loud_open = np.array([opening[k] for k in loud])
    quiet_open = np.array([opening[k] for k in quiet])
    assert np.median(quiet_open) < 50, f"the mouth stays shut in silence: {quiet_open}"
    assert np.median(loud_open) > 500, f"the mouth opens during bursts: {loud_open}"
    assert loud_open.mean() > 10 * max(1.0, quiet_open.mean())

    # outside the face box, each frame is its background
    bgs = backgrounds(demo_dir, MODEL_A)
    for f in frames[::17]:
        assert outside_rect_diff(f.decode(), bgs[f.background_index], f.rect) < 3


@pytest.mark.processes
def test_stream_equals_the_whole_clip_computation(make_cluster, demo_dir):
    """Each batch's PCM span gives the windows a whole-clip computation gives (format patch)."""
    import onnxruntime as ort

    sup = make_cluster()
    seconds = 2.93  # 73.25 frames -> 73; the tail uses repeated edge audio
    pcm, _ = bursts(seconds, period=1.0, on=0.5, seed=3)
    with Client(sup.config.frontend) as client:
        with StreamSession(client, MODEL_B, batch_size=7, format="patch") as session:
            push_in_chunks(session, pcm, seed=5)
            session.close()
            streamed = list(session.frames(timeout=30))
        n = round(seconds * FPS)
        assert len(streamed) == n
        enc = ort.InferenceSession(str(demo_dir / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])
        name = enc.get_inputs()[0].name
        clip = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
        clip[:min(pcm.size, clip.size)] = pcm[:clip.size]
        windows = features_from_pcm(clip, lambda x: enc.run(None, {name: x})[0], 0, np.arange(n))
        reference = []
        for s in range(0, n, 20):
            r = client.infer(MODEL_B, start_frame_idx=s, audio_features=windows[s:s + 20], format="patch")
            reference += [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) for data in r.frames]
    got = [f.decode().astype(np.int16) for f in streamed]
    diffs = [int(np.abs(g - ref).max()) for g, ref in zip(got, reference)]
    print("max |streamed - whole clip| per frame:", diffs)
    # Identical windows give identical JPEG bytes; the encoder's float rounding can differ in the
    # last bit between batch shapes, which JPEG quantisation turns into a level or three.
    assert max(diffs) <= 4 and sum(d == 0 for d in diffs) >= 0.8 * n, \
        f"streamed frames differ from the whole-clip ones: {diffs}"
    # the comparison has teeth: one frame off gives visibly different mouths
    shifted = [int(np.abs(got[k] - reference[k + 1]).max()) for k in range(n - 1) if got[k].shape == reference[k + 1].shape]
    assert max(shifted) > 50


@pytest.mark.processes
def test_switch_mid_stream_lands_on_a_batch_boundary(make_cluster, demo_dir):
    sup = make_cluster()
    pcm, _ = bursts(5.0, seed=2)
    half = pcm.size // 2
    with Client(sup.config.frontend) as client, StreamSession(client, MODEL_A, batch_size=5) as session:
        session.push(pcm[:half])
        first = [session.get(timeout=30) for _ in range(20)]
        session.switch(MODEL_B)
        push_in_chunks(session, pcm[half:], seed=3)
        session.close()
        frames = first + list(session.frames(timeout=30))
        switches = session.stats()["switches"]
    n = round(5.0 * FPS)
    assert [f.index for f in frames] == list(range(n))
    models = [f.model_id for f in frames]
    c = models.index(MODEL_B)
    assert c >= 20 and c % 5 == 0, f"the switch lands on a batch boundary after the switch call, got frame {c}"
    assert models == [MODEL_A] * c + [MODEL_B] * (n - c)
    assert switches == [[0, MODEL_A], [c, MODEL_B]]
    bg_a, bg_b = backgrounds(demo_dir, MODEL_A), backgrounds(demo_dir, MODEL_B)
    for f in frames[c - 3:c + 3]:
        image = f.decode()
        own = bg_a if f.model_id == MODEL_A else bg_b
        other = bg_b if f.model_id == MODEL_A else bg_a
        assert outside_rect_diff(image, own[f.background_index], f.rect) < 3
        assert outside_rect_diff(image, other[f.background_index], f.rect) > 10


@pytest.mark.processes
def test_a_worker_killed_mid_stream_costs_no_frame(make_cluster):
    sup = make_cluster()
    seconds = 8.0
    pcm, _ = bursts(seconds, seed=4)
    with Client(sup.config.frontend) as client, StreamSession(client, MODEL_A, batch_size=5,
                                                              max_in_flight=4) as session:
        session.push(pcm)
        session.close()
        frames = [session.get(timeout=30) for _ in range(25)]
        holders = next(m["loaded_on"] for m in client.list_models() if m["model_id"] == MODEL_A)
        victim = next(c for c in sup.children if c.name in holders)
        assert session.stats()["in_flight"] > 0, "the kill must hit work in flight"
        proc = victim.proc  # the Supervisor may restart the worker (a new Popen) once it is dead
        os.kill(proc.pid, signal.SIGKILL)
        frames += list(session.frames(timeout=60))
        retried = sum(m["stats"].get("retried", 0) for m in client.list_models())
        lat = session.latency()
    n = round(seconds * FPS)
    assert proc.wait(5) == -signal.SIGKILL
    assert [f.index for f in frames] == list(range(n)), "a worker's death costs no frame"
    assert retried + lat["retries"] >= 1, "some batch was in flight on the dead worker and was sent again"


@pytest.mark.processes
def test_async_session_streams_the_same_frames(make_cluster):
    sup = make_cluster()
    pcm, _ = bursts(3.0, seed=6)

    async def run():
        async with AsyncClient(sup.config.frontend) as client:
            async with AsyncStreamSession(client, MODEL_A, batch_size=4) as session:
                async def feed():
                    for i in range(0, pcm.size, 1000):
                        session.push(pcm[i:i + 1000])
                        await asyncio.sleep(0)
                    session.switch(MODEL_B)
                    session.close()

                feeder = asyncio.ensure_future(feed())
                frames = [f async for f in session.frames()]
                await feeder
                return frames, session.latency()

    frames, lat = asyncio.run(run())
    assert [f.index for f in frames] == list(range(75))
    assert all(f.pts == f.index / 25 for f in frames)
    assert lat["frames"] == 75


# --- conversation: switch by audio position, interrupt, idle frames, lookahead ------------------


def test_switch_and_interrupt_positions_in_the_core_do_not_depend_on_the_sender():
    core = StreamCore(MODEL_A, batch_size=5, max_in_flight=100)
    core.push(np.zeros(2 * SR + 100, np.float32))  # 50 frames + 100 samples, nothing planned yet
    assert core.switch(MODEL_B) == 55  # the first boundary at or after 50.16 frames
    assert core.switch(MODEL_A, at_frame=57) == 57  # an explicit frame: a batch ends there
    core.push(np.zeros(2 * SR, np.float32))
    planned = [(b.start, b.size, b.model_id) for b in core.plan()]
    assert (50, 5, MODEL_A) in planned and (55, 2, MODEL_B) in planned and (57, 5, MODEL_A) in planned
    with pytest.raises(BadRequest, match="at_frame"):
        core.switch(MODEL_B, at_frame=-1)
    with pytest.raises(BadRequest, match="lookahead_frames"):
        StreamCore(MODEL_A, lookahead_frames=13)
    # lookahead 4: batch [0, 5) goes out once 9 frames are here; the span ends there
    core = StreamCore(MODEL_A, batch_size=5, lookahead_frames=4)
    core.push(np.zeros(9 * SAMPLES_PER_FRAME - 1, np.float32))
    assert core.plan() == []
    core.push(np.zeros(1, np.float32))
    (b,) = core.plan()
    assert (b.first, b.end) == (0, 9)


@pytest.mark.processes
def test_switch_after_two_seconds_lands_at_frame_50_whatever_the_sender_did(make_cluster):
    sup = make_cluster()
    pcm, _ = bursts(4.0, seed=7)
    landed = []
    with Client(sup.config.frontend) as client:
        for sender_ahead in (False, True):
            with StreamSession(client, MODEL_A, batch_size=5, max_in_flight=2) as session:
                frames = []
                if sender_ahead:  # the sender has already sent (and got back) batches when switch() comes
                    session.push(pcm[:SR + SR // 2])
                    frames.append(session.get(timeout=30))
                    session.push(pcm[SR + SR // 2:2 * SR])
                else:  # faster than real time, all at once: nothing has been sent yet
                    session.push(pcm[:2 * SR])
                assert session.switch(MODEL_B) == 50
                session.push(pcm[2 * SR:])
                session.close()
                frames += list(session.frames(timeout=30))
                switches = session.stats()["switches"]
            assert [f.index for f in frames] == list(range(100))
            models = [f.model_id for f in frames]
            landed.append(models.index(MODEL_B))
            assert models == [MODEL_A] * landed[-1] + [MODEL_B] * (100 - landed[-1])
            assert switches == [[0, MODEL_A], [50, MODEL_B]]
    assert landed == [50, 50], f"the switch lands where the audio was, on every run: {landed}"


@pytest.mark.processes
def test_interrupt_mid_utterance_keeps_indices_and_drops_the_unsaid_audio(make_cluster):
    sup = make_cluster()
    speech, _ = bursts(4.0, period=10.0, on=10.0, seed=9)  # one utterance from 0.4 s to the end

    async def run():
        async with AsyncClient(sup.config.frontend) as client:
            async with AsyncStreamSession(client, MODEL_A, batch_size=5, max_in_flight=3) as session:
                session.push(speech)  # 4 s at once, as a TTS engine does
                frames = [await session.get(timeout=30) for _ in range(20)]
                cut = session.interrupt()
                session.push(np.zeros(2 * SR, np.float32))  # the user talks; the avatar is silent
                session.close()
                frames += [f async for f in session.frames()]
                return frames, cut, session.stats()

    frames, cut, stats = asyncio.run(run())
    assert 20 <= cut < 80, cut
    n = cut + 50
    assert [f.index for f in frames] == list(range(n)), "indices go on from the cut, none missing"
    assert all(f.pts == f.index / FPS for f in frames)
    assert stats["interrupts"][0]["cut"] == cut and stats["interrupts"][0]["dropped_samples"] > 0
    opening = [mouth(f) for f in frames]
    print("cut", cut, "mouth opening per frame:", opening)
    assert np.median(opening[18:cut]) > 500, "the utterance opens the mouth before the cut"
    # From cut+9 on, a frame's audio window holds only what came after the cut: silence. Any frame
    # made of the dropped speech would open the mouth.
    after = opening[cut + 9:]
    assert max(after) < 50, f"frames after the cut show no dropped audio: {after}"


@pytest.mark.processes
def test_idle_frames_equal_the_full_path_on_a_real_worker(make_cluster, demo_dir):
    import onnxruntime as ort

    sup = make_cluster(cluster={"per_gpu": 1})
    span = np.zeros((5 + 21) * SAMPLES_PER_FRAME, np.float32)  # batch [9, 14): frames [0, 26) of audio
    enc = ort.InferenceSession(str(demo_dir / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])
    name = enc.get_inputs()[0].name
    windows = features_from_pcm(span, lambda x: enc.run(None, {name: x})[0], 0, np.arange(9, 14))
    with Client(sup.config.frontend) as client:
        first = client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_pcm=span, audio_frame_offset=0,
                             format="raw")
        again = client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_pcm=np.zeros(span.size, np.int16),
                             audio_frame_offset=0, format="raw")
        full = client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_features=windows, format="raw")
        talking, _ = bursts(26 * SAMPLES_PER_FRAME / SR, period=1.0, on=0.9, seed=8)
        spoken = client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_pcm=talking + np.float32(0.01),
                              audio_frame_offset=0, format="raw")
        jpeg_full = client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_features=windows, format="jpeg")
        jpeg_idle = [client.infer(MODEL_C, start_frame_idx=9, batch_size=5, audio_pcm=span, audio_frame_offset=0,
                                  format="jpeg") for _ in range(2)]
    # the finished frames are kept too: the second silent jpeg batch is a lookup, byte for byte the same
    assert jpeg_idle[1].header["idle_frames"] == 5 and jpeg_idle[1].timings["encode_ms"] == 0
    for idle_run in jpeg_idle:
        assert [bytes(f) for f in idle_run.frames] == [bytes(f) for f in jpeg_full.frames]
    assert first.header["idle_frames"] == 0, "the first silent batch runs the UNet and fills the cache"
    assert again.header["idle_frames"] == 5, "the same backgrounds again: no UNet"
    assert spoken.header["idle_frames"] == 0
    assert again.timings["inference_ms"] == 0
    for a, b, c in zip(first.frames, again.frames, full.frames):
        assert np.array_equal(a, b), "cached frames are composited bit-identically"
        diff = np.abs(b.astype(np.int16) - c).max()
        assert diff == 0, f"idle frame differs from the full UNet path by {diff}"
    assert max(np.abs(s.astype(np.int16) - c).max() for s, c in zip(spoken.frames, full.frames)) > 30


def test_silence_is_defined_so_that_the_mel_sits_at_its_floor():
    from lipsync_cluster.common.audio import melspectrogram
    from lipsync_cluster.worker.idle import SILENCE_THRESHOLD, is_silent

    rng = np.random.default_rng(0)
    worst = (np.sign(rng.standard_normal(SR)) * SILENCE_THRESHOLD * 0.999).astype(np.float32)
    assert is_silent(worst) and is_silent(np.zeros(640, np.int16))
    assert np.array_equal(melspectrogram(worst), melspectrogram(np.zeros(SR, np.float32)))
    assert not is_silent(np.array([0, 1, 0], np.int16)), "one int16 step is not silence"
    assert not is_silent(worst * 2) and not is_silent(None)


def test_listening_silence_keeps_a_real_time_talkers_pauses_at_their_length():
    """The stream's own listening (the WebSocket gateway's) follows the same rule as the AV core's
    (ListeningClock): a caller that sends 100 ms chunks in real time and nothing while silent finds
    each chunk where its own clock puts it, after any number of pauses; silence never goes inside
    speech for a chunk less than the grace late."""
    t = [50.0]
    core = StreamCore(MODEL_A, batch_size=5, clock=lambda: t[0])
    core.set_listening(True)
    talk = [1] * 5 + [0] * 3 + [1] * 4 + [0] * 12 + [1] * 3 + [0] * 2 + [1] * 6
    rng = np.random.default_rng(1)
    for i, on in enumerate(talk):
        for step in range(4):  # the session's idle timer ticks between the chunks
            t[0] = 50.0 + i * 0.1 + step * 0.025 + 0.002
            if step == 0 and on:
                core.push(0.1 * rng.standard_normal(1600).astype(np.float32))
                off = core.samples - 1600 - i * 1600
                assert 0 <= off <= 0.002 * 16000 + 1, (i, off)  # never early, never later than the sender
            else:
                core.fill_idle()
    assert core.idle_samples == sum(1 - x for x in talk) * 1600 + 32  # the pauses, at their length
    t[0] = 50.0 + len(talk) * 0.1 + 1.31  # the last pause: whole frames up to the wall clock (4.81 s)
    core.fill_idle()
    assert core.samples == 120 * 640


@pytest.mark.processes
def test_listening_keeps_frames_flowing_from_the_idle_cache(make_cluster):
    sup = make_cluster()
    pcm, _ = bursts(1.0, period=10.0, on=10.0, seed=12)

    async def run():
        async with AsyncClient(sup.config.frontend) as client:
            async with AsyncStreamSession(client, MODEL_A, batch_size=5) as session:
                session.push(pcm)
                session.set_listening(True)
                frames = []
                t0 = time.monotonic()
                while time.monotonic() - t0 < 4.0:
                    frame = await session.get(timeout=10)
                    frames.append(frame)
                return frames, session.stats()

    frames, stats = asyncio.run(run())
    print("frames", len(frames), "stats", stats)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert len(frames) >= 25 + 50, "the speech, then idle frames in real time"
    assert stats["listening"] and stats["idle_frames"] >= 25 and stats["idle_seconds"] > 1.5


def test_sync_interrupt_drops_batches_in_flight_and_goes_on_from_the_cut():
    client = FlakyClient()
    with StreamSession(client, MODEL_A, batch_size=5, max_in_flight=4) as session:
        session.push(np.zeros(3 * SR, np.float32))
        frames = [session.get(timeout=10) for _ in range(10)]
        cut = session.interrupt()
        sent_before = len(client.calls)
        session.push(np.zeros(SR, np.float32))
        session.close()
        frames += list(session.frames(timeout=10))
        stats = session.stats()
    assert 10 <= cut <= 75
    assert [f.index for f in frames] == list(range(cut + 25))
    assert all(f.pts == f.index / FPS for f in frames)
    assert stats["interrupts"][0]["cut"] == cut and stats["total_frames"] == cut + 25
    # after the cut, batches start again at the cut: [cut, cut+5), ...
    assert client.calls[sent_before] == cut
