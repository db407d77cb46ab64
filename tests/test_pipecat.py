"""Pipecat: LipsyncVideoService in a real Pipecat pipeline (worker + runner), real speech, a real cluster.

Speech comes from espeak-ng (Debian package; `make test` installs it) as TTSAudioRawFrame chunks of
20 ms; the pipeline is [LipsyncVideoService, a sink that collects frames]. Checked: one image per
40 ms of audio, image and audio frames paired by index and equal in duration, the TTS audio comes
out sample for sample, TTSStoppedFrame after the last speech frame, idle frames with silence after
it; an InterruptionFrame mid-utterance cuts images and audio together.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the 'pipecat' extra is not installed (pip install '.[pipecat]')")

from pipecat.frames.frames import (EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame,  # noqa: E402
                                   OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

try:  # pipecat >= 1.3 names them PipelineWorker / WorkerRunner; PipelineTask / PipelineRunner before
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:  # pragma: no cover
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask

from lipsync_cluster.integrations.pipecat import FRAME_INDEX_KEY, LipsyncVideoService  # noqa: E402

pytestmark = pytest.mark.processes

TEXT = "Hello there. I am the avatar of a lip sync cluster, and my mouth moves with my voice."


def espeak(tmp_path: Path, text: str = TEXT) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng; `make test` installs it)")
    out = tmp_path / "speech.wav"
    subprocess.run([exe, "-w", str(out), text], check=True, timeout=60)
    with wave.open(str(out)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


class Sink(FrameProcessor):
    """Collects what reaches the end of the pipeline, taking each audio frame's duration as a player would
    (so an interruption finds frames queued, as it does at a real output transport)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
            self.changed.set()
            if isinstance(frame, OutputAudioRawFrame):
                await asyncio.sleep(frame.num_frames / frame.sample_rate)
        await self.push_frame(frame, direction)

    async def wait_for(self, cond, timeout: float = 60.0) -> None:
        async def loop():
            while not cond():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def of(self, *types) -> list:
        return [f for f in self.frames if isinstance(f, types)]


def tts_frames(pcm: np.ndarray, rate: int) -> list[Frame]:
    step = rate // 50  # 20 ms chunks, as TTS services send them
    return [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1)
            for i in range(0, len(pcm), step)]


async def run_pipeline(sup, rate: int, body) -> Sink:
    avatar = LipsyncVideoService("demo_ada", endpoint=sup.config.frontend,
                                 session_options={"lookahead_frames": 4, "batch_size": 2, "format": "raw"})
    sink = Sink()
    task = PipelineTask(Pipeline([avatar, sink]), params=PipelineParams(audio_out_sample_rate=rate),
                        idle_timeout_secs=None, enable_rtvi=False)
    runner = PipelineRunner(handle_sigint=False)
    if hasattr(runner, "add_workers"):  # pipecat >= 1.3
        await runner.add_workers(task)
        run = asyncio.create_task(runner.run())
    else:  # pragma: no cover
        run = asyncio.create_task(runner.run(task))
    try:
        await body(task, sink)
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(run, 60)
    finally:
        if not run.done():
            await task.cancel()
            await asyncio.wait_for(run, 30)
    return sink


def pairs(sink: Sink) -> tuple[list, list]:
    images = sink.of(OutputImageRawFrame)
    audio = sink.of(OutputAudioRawFrame)
    return images, audio


def test_pipecat_pipeline_lip_syncs_real_speech_in_step(make_cluster, tmp_path):
    sup = make_cluster()
    pcm, rate = espeak(tmp_path)  # 22050 Hz
    assert len(pcm) > rate * 2

    async def body(task, sink):
        await task.queue_frames([TTSStartedFrame(), *tts_frames(pcm, rate), TTSStoppedFrame()])
        await sink.wait_for(lambda: sink.of(TTSStoppedFrame))
        n_stop = len(sink.frames)
        await sink.wait_for(lambda: len(sink.of(OutputImageRawFrame)) > len(pcm) * 25 // rate + 5)  # idle frames
        assert n_stop < len(sink.frames)

    sink = asyncio.run(run_pipeline(sup, rate, body))
    images, audio = pairs(sink)
    assert [f.metadata[FRAME_INDEX_KEY] for f in images] == list(range(len(images)))
    assert [f.metadata[FRAME_INDEX_KEY] for f in audio] == list(range(len(images)))
    for image in images:
        assert image.size == (1280, 720) and image.format == "RGB" and len(image.image) == 1280 * 720 * 3
        assert image.sync_with_audio
    # exactly 40 ms of audio per image: 882 samples at 22050 Hz
    assert all(a.sample_rate == rate and a.num_frames == 882 for a in audio)
    assert sum(a.num_frames for a in audio) == len(images) * rate // 25
    # the speech comes out sample for sample, then silence (plain OutputAudioRawFrame)
    speech = [a for a in audio if isinstance(a, TTSAudioRawFrame)]
    assert len(speech) == -(-len(pcm) // 882)
    out = np.frombuffer(b"".join(a.audio for a in audio), "<i2")
    assert np.array_equal(out[:len(pcm)], pcm) and not out[len(speech) * 882:].any()
    # every image is followed by its own audio; TTSStoppedFrame right after the last speech frame
    order = [(type(f).__name__, f.metadata.get(FRAME_INDEX_KEY)) for f in sink.frames
             if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame, TTSStoppedFrame))]
    for k in range(len(images)):
        i = order.index(("OutputImageRawFrame", k))
        assert order[i + 1][1] == k and order[i + 1][0] in ("TTSAudioRawFrame", "OutputAudioRawFrame")
    stop = order.index(("TTSStoppedFrame", None))
    assert order[stop - 1] == ("TTSAudioRawFrame", len(speech) - 1)


def test_an_interruption_cuts_images_and_audio_together(make_cluster, tmp_path):
    sup = make_cluster()
    pcm, rate = espeak(tmp_path)
    out_rate = 24000  # the pipeline's rate differs from the TTS's: the service resamples first

    async def body(task, sink):
        await task.queue_frames([TTSStartedFrame(), *tts_frames(pcm, rate), TTSStoppedFrame()])
        await sink.wait_for(lambda: len(sink.of(OutputImageRawFrame)) >= 15)
        await task.queue_frame(InterruptionFrame())
        await sink.wait_for(lambda: sink.of(InterruptionFrame))
        at = len(sink.frames)
        await sink.wait_for(lambda: len(sink.frames) > at + 30)  # idle frames after the cut
        sink.cut_at = at

    sink = asyncio.run(run_pipeline(sup, out_rate, body))
    images, audio = pairs(sink)
    idx = [f.metadata[FRAME_INDEX_KEY] for f in images]
    # in order; a gap only at the cut: what the sink had queued was dropped by the interruption (as a
    # transport drops it), images and audio alike
    assert idx == sorted(set(idx)) and [f.metadata[FRAME_INDEX_KEY] for f in audio] == idx
    before = [f for f in sink.frames[:sink.cut_at] if isinstance(f, OutputImageRawFrame)]
    assert idx[len(before):] == list(range(idx[len(before)], idx[-1] + 1))
    assert idx[:len(before)] == list(range(len(before)))
    assert sum(a.num_frames for a in audio) == len(images) * 960
    after = [f for f in sink.frames[sink.cut_at:] if isinstance(f, OutputAudioRawFrame)]
    assert after and not any(isinstance(f, TTSAudioRawFrame) for f in after)  # only silence after the cut
    assert not any(np.frombuffer(f.audio, "<i2").any() for f in after)
    speech = [a for a in audio if isinstance(a, TTSAudioRawFrame)]
    assert 15 <= len(speech) < len(pcm) * 25 // rate - 10  # the rest of the utterance was never shown nor played
    assert not sink.of(TTSStoppedFrame)  # the interrupted utterance's stop went with it
