"""Paired audio and video (lipsync_cluster/client/av.py): frame n gets exactly its 40 ms of the caller's audio.

In-process: the exact frame grid at any rate (no drift), the resampler (chunking-invariant, a tone
comes out as the same tone delayed by the filter's half), pairing, listening silence, segment marks,
cuts. One test against a real cluster (marked ``processes``): 24 kHz speech-like audio in odd chunks
through AsyncAVSession, an interrupt mid-utterance, idle frames after it; and AVSession at 44.1 kHz.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from lipsync_cluster.client import AsyncClient, Client
from lipsync_cluster.client.av import AsyncAVSession, AVCore, AVSession, _wait_for, frame_boundary
from lipsync_cluster.client.stream import IDLE_TICK_S, AsyncStreamSession, StreamFrame, StreamSession
from lipsync_cluster.common.errors import BadRequest


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def frame(k: int) -> StreamFrame:
    """A frame as the stream hands it out (the image does not matter to the pairing)."""
    return StreamFrame(index=k, pts=k / 25, background_index=0, model_id="demo_ada", model_version="v",
                       format="raw", image=np.zeros((2, 2, 3), np.uint8), rect=[0, 0, 1, 1], worker="w",
                       latency_ms=0.0)


def speechlike(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 1200 * t)) * (np.sin(2 * np.pi * 2 * t) > 0)
    x += 0.02 * rng.standard_normal(t.size)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def push_chunks(av, x: np.ndarray, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(x):
        n = int(rng.choice([1, 7, 333, 960, 2049, 4801]))
        av.push(x[i:i + n])
        i += n


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 44100, 48000, 24001, 192000])
def test_the_frame_grid_is_exact_at_any_rate(rate):
    # 1 hour of frames: lengths add up to exactly rate * seconds (a rate that is no multiple of 25
    # carries its remainder), and after the caller's samples of k frames the stream has 640 k.
    k = np.arange(90001)
    bounds = k * rate // 25
    assert bounds[-1] == rate * 3600
    assert set(np.diff(bounds)) <= {rate // 25, rate // 25 + 1}
    core = AVCore(rate, listening=False)
    for f in (1, 2, 3, 25, 1000, 90000):
        assert core.resampler.outputs_for(frame_boundary(f, rate)) == 640 * f


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resampling_keeps_the_tone_and_does_not_depend_on_chunking(rate):
    t = np.arange(rate * 2) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    whole = AVCore(rate, dtype=np.float32, listening=False).push(x)
    core = AVCore(rate, dtype=np.float32, listening=False)
    parts, rng, i = [], np.random.default_rng(3), 0
    while i < x.size:
        n = int(rng.choice([1, 5, 441, 960, 7000]))
        parts.append(core.push(x[i:i + n]))
        i += n
    chunked = np.concatenate(parts)
    assert np.array_equal(whole, chunked)
    assert whole.size == 32000
    delay = core.resampler.delay / rate
    assert delay < 0.0015  # a causal filter: the model hears the audio at most 1.5 ms late
    tt = np.arange(whole.size) / 16000 - delay
    ref = 0.5 * np.sin(2 * np.pi * 440 * tt) + 0.3 * np.sin(2 * np.pi * 2500 * tt)
    err = np.abs(whole[200:-200] - ref[200:-200]).max()
    assert err < (2e-3 if rate > 8000 else 2e-2), err


def test_a_tone_above_8khz_does_not_alias_into_the_model_audio():
    t = np.arange(48000) / 48000
    y = AVCore(48000, dtype=np.float32, listening=False).push((0.5 * np.sin(2 * np.pi * 11000 * t)).astype(np.float32))
    assert np.abs(y[400:]).max() < 0.005  # 11 kHz would alias to 5 kHz without the filter


@pytest.mark.parametrize("rate,channels", [(24000, 1), (44100, 2), (24001, 1)])
def test_frames_get_exactly_their_samples(rate, channels):
    x = speechlike(rate, 3.0)
    if channels == 2:
        x = np.stack([x, x // 2], axis=1)
    core = AVCore(rate, channels=channels, listening=False)
    out16 = []
    rng = np.random.default_rng(2)
    i, k, items = 0, 0, []
    while i < len(x):
        n = int(rng.choice([1, 333, 2049, 4801]))
        out16.append(core.push(x[i:i + n]))
        i += n
        while sum(map(len, out16)) >= 640 * (k + 1):  # a frame is made once its 16 kHz audio is there
            items.append(core.pair(frame(k)))
            k += 1
    assert core.n16 == sum(map(len, out16)) == core.resampler.outputs_for(len(x))
    got = np.concatenate([it.audio for it in items])
    assert got.dtype == np.int16 and got.shape[1:] == x.shape[1:]
    assert np.array_equal(got, x[:len(got)])
    for it in items:
        assert it.sample_offset == it.index * rate // 25
        assert it.num_samples == frame_boundary(it.index + 1, rate) - frame_boundary(it.index, rate)
        assert it.speech and it.sample_rate == rate and it.pts == it.index / 25


def test_float_and_int16_input_share_one_timeline_in_the_callers_dtype():
    core = AVCore(24000, dtype=np.float32, listening=False)
    core.push(np.full(480, 16384, np.int16))
    core.push(np.full(480, -0.25, np.float64))
    item = core.pair(frame(0))
    assert item.audio.dtype == np.float32
    assert np.array_equal(item.audio, np.r_[np.full(480, 0.5), np.full(480, -0.25)].astype(np.float32))


def test_bad_input_is_refused_naming_the_field():
    with pytest.raises(BadRequest, match="sample_rate"):
        AVCore(4000)
    with pytest.raises(BadRequest, match="channels"):
        AVCore(24000, channels=0)
    with pytest.raises(BadRequest, match="dtype"):
        AVCore(24000, dtype=np.int32)
    core = AVCore(24000, channels=2)
    with pytest.raises(BadRequest, match="multiple of channels=2"):
        core.push(np.zeros(3, np.int16))
    with pytest.raises(BadRequest, match=r"\[n, 2\]"):
        core.push(np.zeros((4, 3), np.int16))
    with pytest.raises(BadRequest, match="must lie in"):
        core.push(np.full(4, 2.0, np.float32))
    with pytest.raises(BadRequest, match="non-finite"):
        core.push(np.full(4, np.nan, np.float32))
    with pytest.raises(BadRequest, match="dtype"):
        core.push(np.zeros(4, np.int32))
    assert core.n == 0  # nothing of a refused push was kept
    core.close()
    with pytest.raises(BadRequest, match="after close"):
        core.push(np.zeros(2, np.int16))


def test_listening_appends_whole_frames_of_silence_in_real_time():
    clock = Clock()
    core = AVCore(24000, clock=clock, idle_grace_s=0.12)
    x = speechlike(24000, 0.5)[:11000]  # 11.46 frames: speech ends mid-frame 11
    core.push(x)
    played = 100.0 + 11000 / 24000  # when the 0.458 s pushed at once have played in real time
    clock.t = played + 0.1  # 0.1 s later: within the grace (a late chunk may still come), no silence yet
    assert core.fill_idle().size == 0
    assert core.idle_due_at() == pytest.approx(played + 0.12)
    clock.t = played + 0.13  # a pause: silence from where the speech ended, whole frames up to frame 14's start
    y = core.fill_idle()
    assert core.n == 14 * 960 and core.n16 == 14 * 640
    assert y.size == 14 * 640 - core.resampler.outputs_for(11000)
    assert not y[100:].any()  # digital silence once the filter has passed the speech
    items = [core.pair(frame(k)) for k in range(14)]
    assert [it.speech for it in items] == [True] * 12 + [False] * 2
    assert np.array_equal(items[11].audio[:11000 - 11 * 960], x[11 * 960:]) and not items[11].audio[440:].any()
    core.set_listening(False)
    clock.t += 10
    assert core.fill_idle().size == 0 and core.idle_due_at() is None


def test_a_real_time_talker_with_pauses_keeps_the_timeline_on_the_wall_clock():
    """A caller that sends 100 ms chunks in real time and sends nothing while it is silent (the
    WebRTC bench's talker, a browser that gates its mic): listening fills the pauses so that every
    chunk lands where the caller's own clock puts it. The silence used to start ``idle_grace_s``
    after the last push and count from there, so each pause lost the grace less a chunk, plus the
    part of a frame not yet filled when the talk resumed: the timeline fell behind the wall clock
    and a player at 25 fps ran out of frames (fillers at speech onsets, issue 19)."""
    rate, chunk = 24000, 2400
    clock = Clock()
    core = AVCore(rate, clock=clock, idle_grace_s=0.12, idle_ahead_frames=10 ** 6)
    t0 = clock.t
    talk = [True] * 7 + [False] * 3 + [True] * 5 + [False] * 20 + [True] * 4 + [False] * 1 + [True] * 6 \
        + [False] * 2 + [True] * 3
    for i, on in enumerate(talk):
        for step in range(4):  # a reader polls every 25 ms between the chunks
            clock.t = t0 + i * 0.1 + step * 0.025 + 0.0013  # sent a little late, as a sleeping loop does
            if step == 0 and on:
                core.push(speechlike(rate, 0.1, seed=i))
                off = core.n - chunk - i * chunk  # where the chunk landed against the talker's own clock
                if i > 0 and not talk[i - 2] and not talk[i - 1]:
                    # after a pause: exactly there (within the sender's lateness, 1.3 ms = 31 samples)
                    assert 0 <= off <= 32, (i, off)
                else:  # a pause shorter than the grace is a late chunk: no silence in the speech, the
                    assert -0.12 * rate <= off <= 32, (i, off)  # next pause makes it up
            else:
                core.fill_idle()
    # after the last chunk the silence keeps the wall clock too, in whole frames (at most one behind)
    clock.t = t0 + 10.0
    core.fill_idle()
    assert 10 * rate - 960 <= core.n <= 10 * rate and core.n % 960 == 0


def test_a_late_chunk_within_the_grace_gets_no_silence_before_it():
    clock = Clock()
    core = AVCore(16000, clock=clock, idle_grace_s=0.12)
    core.push(speechlike(16000, 0.1))
    clock.t += 0.1 + 0.1  # the next chunk 100 ms late: still the same utterance
    assert core.fill_idle().size == 0
    core.push(speechlike(16000, 0.1))
    assert core.n == 3200 and core.idle_samples == 0  # no silence inside the utterance, the schedule kept
    clock.t += 0.6  # a pause: its silence goes before the next chunk, which starts at 0.8 s as it was sent
    core.push(speechlike(16000, 0.1))
    assert core.idle_samples == 9600 and core.n == 12800 + 1600


def test_listening_silence_stays_a_bounded_distance_ahead_of_a_slow_reader():
    clock = Clock()
    core = AVCore(24000, clock=clock, idle_ahead_frames=14)
    clock.t += 60  # a minute without audio and without reading: only 14 frames of silence, not 1500
    assert core.fill_idle().size == 14 * 640 and core.n == 14 * 960
    assert core.idle_due_at() is None and core.fill_idle().size == 0
    # a reader waiting now still looks again within a frame (an interrupt would make silence due)
    assert _wait_for(core) == IDLE_TICK_S
    for k in range(3):
        core.pair(frame(k))
    assert core.idle_due_at() is not None and core.fill_idle().size == 3 * 640  # the reader read 3 frames
    core.push(speechlike(24000, 0.1))  # speech goes on right after, whatever the cap
    assert core.n == 17 * 960 + 2400


def test_segment_marks_land_on_the_frame_that_plays_the_last_sample():
    core = AVCore(24000, listening=False)
    assert core.end_segment() is True  # nothing pushed: ended now
    core.push(speechlike(24000, 0.1)[:2000])  # frames 0, 1 and 80 samples of frame 2
    assert core.end_segment() is False
    core.push(speechlike(24000, 0.1)[:880])  # the rest of frame 2
    core.push(speechlike(24000, 0.1)[:960])
    assert core.end_segment() is False  # ends exactly at frame 3's end
    ends = [core.pair(frame(k)).segment_ends for k in range(4)]
    assert ends == [0, 0, 1, 1]
    assert core.end_segment() is True  # everything pushed has been paired


def test_a_cut_restarts_both_timelines_at_the_frame_start():
    core = AVCore(48000, listening=False)
    x = speechlike(48000, 1.0)
    core.push(x[:30000])  # 15.6 frames
    items = [core.pair(frame(k)) for k in range(5)]
    core.end_segment()
    core.cut(5)  # the stream dropped everything from frame 5 on
    assert core.n == 5 * 1920 and core.n16 == 5 * 640 and core.marks == []
    assert core.cuts[-1] == {"cut": 5, "dropped_samples": 30000 - 9600, "dropped_marks": 1}
    y = core.push(x[40000:40000 + 1920 * 3])
    assert y.size == 3 * 640 and core.n16 == 8 * 640
    later = [core.pair(frame(k)) for k in range(5, 8)]
    assert np.array_equal(np.concatenate([it.audio for it in items + later]),
                          np.r_[x[:9600], x[40000:40000 + 5760]])


# --- against a real cluster ---------------------------------------------------------------------


@pytest.mark.processes
def test_av_session_on_a_real_cluster_pairs_interrupts_and_idles(make_cluster):
    sup = make_cluster()
    rate = 24000
    speech = speechlike(rate, 3.0)

    async def run():
        async with AsyncClient(sup.config.frontend) as client:
            session = AsyncStreamSession(client, "demo_ada", lookahead_frames=4)
            async with AsyncAVSession(session, rate, idle_grace_s=0.1) as av:
                push_chunks(av, speech)
                av.end_segment()
                items = []
                async for item in av.frames():  # the whole utterance, then listening silence
                    items.append(item)
                    if item.index >= 85:
                        break
                assert [it.index for it in items] == list(range(86))
                assert sum(it.segment_ends for it in items) == 1 and items[74].segment_ends == 1
                audio = np.concatenate([it.audio for it in items])
                assert np.array_equal(audio[:len(speech)], speech) and not audio[len(speech) + 100:].any()
                assert all(it.speech for it in items[:75]) and not any(it.speech for it in items[76:])
                assert all(it.num_samples == 960 for it in items)
                # barge-in in the middle of the next utterance: the unread frames and unsaid audio go
                push_chunks(av, speech, seed=2)
                first = await av.get()
                cut = av.interrupt()
                assert cut == first.index + 1
                av.push(speech[:9600])  # a new reply: 10 frames, then silence again
                av.end_segment()
                after = []
                while len(after) < 14:
                    after.append(await av.get())
                assert [it.index for it in after] == list(range(cut, cut + 14))
                assert np.array_equal(np.concatenate([it.audio for it in after[:10]]), speech[:9600])
                assert after[9].segment_ends == 1 and not any(it.speech for it in after[11:])
                assert av.stats()["av"]["cuts"][0]["cut"] == cut
                av.close()
                rest = [it async for it in av.frames()]
                assert all(it.index == cut + 14 + i for i, it in enumerate(rest))

    asyncio.run(run())

    # The blocking twin at 44.1 kHz stereo, pushed from another thread; close() pads the last frame.
    x = np.stack([speechlike(44100, 1.5), speechlike(44100, 1.5, seed=5)], axis=1)[:44100 + 1000]
    with Client(sup.config.frontend) as client, \
            AVSession(StreamSession(client, "demo_ben"), 44100, channels=2, listening=False) as av:
        assert av.switch("demo_cleo", at_frame=13) == 13
        pusher = threading.Thread(target=lambda: (push_chunks(av, x), av.close()))
        pusher.start()
        items = list(av.frames(timeout=60))
        pusher.join()
    assert len(items) == round(av.core.n16 / 640) == 26
    audio = np.concatenate([it.audio for it in items])
    assert audio.shape == (26 * 1764, 2) and np.array_equal(audio[:len(x)], x) and not audio[len(x):].any()
    assert [it.frame.model_id for it in items] == ["demo_ben"] * 13 + ["demo_cleo"] * 13
    assert items[0].decode().shape == (720, 1280, 3)
