"""Pipecat: a video service that lip-syncs the TTS audio and emits images and audio in step.

    from lipsync_cluster.integrations.pipecat import LipsyncVideoService

    avatar = LipsyncVideoService("demo_ada", endpoint="tcp://127.0.0.1:5555")
    pipeline = Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts, avatar,
                         transport.output(), context_aggregator.assistant()])

What it does with each frame (everything else passes through):

* ``TTSAudioRawFrame``: the audio goes to the cluster (resampled to the pipeline's output rate first
  when a TTS speaks at another); it is not passed on as it came. For every video frame the service
  emits an ``OutputImageRawFrame`` (RGB, ``sync_with_audio=True``: the output transport shows it
  when the audio before it has been sent) and then exactly that frame's 40 ms of the caller's audio,
  as a ``TTSAudioRawFrame`` while there is speech and an ``OutputAudioRawFrame`` of silence while
  idle. Both carry ``metadata["lipsync_frame_index"]``.
* ``TTSStoppedFrame``: held back until the frame that plays the utterance's last sample is out, so
  the bot stops speaking when the mouth does.
* ``InterruptionFrame``: ``interrupt()``: the frames not yet emitted and the audio not yet turned into
  frames are dropped (both), then the interruption goes on downstream (the transport drops what it
  has queued).
* ``UserStartedSpeakingFrame``: listening (idle frames with silence while no audio comes); listening
  is on from the start, so the video never stalls.
* ``EndFrame``: the frames of the audio received so far are emitted, then the end goes on.

Needs the ``pipecat`` extra (``pip install 'lipsync-cluster[pipecat]'``).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Optional

from ..common.extras import MissingExtra

try:
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame,
                                       OutputImageRawFrame, StartFrame, TTSAudioRawFrame, TTSStoppedFrame,
                                       UserStartedSpeakingFrame)
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ModuleNotFoundError as exc:  # pragma: no cover - the message is the point
    raise MissingExtra("lipsync_cluster.integrations.pipecat", "pipecat", exc.name) from None

from ..client import AsyncClient
from ..client.av import AVFrame
from ..client.stream import IDLE_GRACE_S
from ..common.errors import BadRequest
from ._avatar import DEFAULT_ENDPOINT, AvatarStream, pcm_int16, rgb

FRAME_INDEX_KEY = "lipsync_frame_index"


class LipsyncVideoService(FrameProcessor):
    """Turns TTS audio into avatar video plus the same audio, frame by frame, through a lipsync cluster.

    ``model_id``: the avatar; ``endpoint`` (or an open ``client``: an :class:`AsyncClient` of this loop);
    ``sample_rate``: the rate of the audio it emits (default: the pipeline's ``audio_out_sample_rate``);
    ``session_options``: the stream's (``lookahead_frames`` 4, ``batch_size`` 2, ``format`` raw by
    default); ``listening``/``idle_grace_s``: idle frames when no audio comes (on; 0.12 s).
    """

    def __init__(self, model_id: str, *, endpoint: str = DEFAULT_ENDPOINT, client: Optional[AsyncClient] = None,
                 sample_rate: Optional[int] = None, session_options: Optional[dict] = None,
                 client_options: Optional[dict] = None, listening: bool = True,
                 idle_grace_s: float = IDLE_GRACE_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model_id = model_id
        self._options = dict(endpoint=endpoint, client=client, session_options=session_options,
                             client_options=client_options, listening=listening, idle_grace_s=idle_grace_s)
        self._sample_rate = sample_rate
        self._stream: Optional[AvatarStream] = None
        self._emit_task: Optional[asyncio.Task] = None
        self._resampler = create_stream_resampler()
        self._held_stops: deque[TTSStoppedFrame] = deque()
        self._epoch = 0  # bumped by each interruption: an item read before it is not emitted after it
        # An image and its audio go downstream together: an interruption waits for the pair in progress,
        # so the InterruptionFrame follows both (and the transport drops both) or neither went.
        self._emit_lock = asyncio.Lock()

    @property
    def av(self):
        """The :class:`~lipsync_cluster.client.av.AsyncAVSession` (after the StartFrame), e.g. for ``switch``."""
        return None if self._stream is None else self._stream.av

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._start(frame)
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and self._stream is not None:
            await self._push_audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and self._stream is not None:
            if self._stream.av.end_segment():
                await self.push_frame(frame, direction)
            else:
                self._held_stops.append(frame)
        elif isinstance(frame, InterruptionFrame):
            async with self._emit_lock:
                self._interrupt()
                await self.push_frame(frame, direction)
        elif isinstance(frame, UserStartedSpeakingFrame):
            if self._stream is not None:
                self._stream.av.set_listening(True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._finish()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _start(self, frame: StartFrame) -> None:
        if self._stream is not None:
            return
        setup = getattr(self, "processor_setup", None)  # pipecat >= 1.8 says it here, before on the StartFrame
        rate = self._sample_rate or getattr(setup, "audio_out_sample_rate", None) or frame.audio_out_sample_rate
        self._sample_rate = rate
        self._stream = AvatarStream(self._model_id, rate, **self._options)
        self._emit_task = self.create_task(self._emit(), name=f"{self.name}::emit")

    async def _push_audio(self, frame: TTSAudioRawFrame) -> None:
        if frame.num_channels != 1:
            await self.push_error(error_msg=f"{self}: TTS audio must be mono; got {frame.num_channels} channels")
            return
        audio = frame.audio
        if frame.sample_rate != self._sample_rate:
            audio = await self._resampler.resample(audio, frame.sample_rate, self._sample_rate)
        try:
            self._stream.av.push(pcm_int16(audio, 1, "TTSAudioRawFrame"))
        except BadRequest as exc:
            await self.push_error(error_msg=f"{self}: {exc}", exception=exc)

    def _interrupt(self) -> None:
        self._epoch += 1
        self._held_stops.clear()  # control frames: an interruption cancels them in Pipecat too
        self._resampler = create_stream_resampler()  # no tail of the cut utterance in the next one
        if self._stream is not None:
            self._stream.av.interrupt()

    async def _emit(self) -> None:
        try:
            async for item in self._stream.av.frames():
                epoch = self._epoch  # read with the item (no await in between)
                async with self._emit_lock:
                    if epoch == self._epoch:
                        await self._emit_item(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session ended with an error: say so upstream
            await self.push_error(error_msg=f"{self}: lip-sync stream failed: {exc}", exception=exc)

    async def _emit_item(self, item: AVFrame) -> None:
        image = rgb(item.frame)
        out = OutputImageRawFrame(image=image.tobytes(), size=(image.shape[1], image.shape[0]), format="RGB")
        out.sync_with_audio = True
        cls = TTSAudioRawFrame if item.speech else OutputAudioRawFrame
        audio = cls(audio=item.audio.tobytes(), sample_rate=item.sample_rate, num_channels=1)
        for f in (out, audio):
            f.metadata[FRAME_INDEX_KEY] = item.index
            await self.push_frame(f)
        for _ in range(item.segment_ends):
            if self._held_stops:
                await self.push_frame(self._held_stops.popleft())

    async def _finish(self) -> None:
        """EndFrame: emit the frames of everything received, then close."""
        if self._stream is None:
            return
        self._stream.av.close()
        if self._emit_task is not None:
            await self._emit_task
            self._emit_task = None
        while self._held_stops:
            await self.push_frame(self._held_stops.popleft())
        await self._stream.aclose()
        self._stream = None

    async def _stop(self) -> None:
        if self._emit_task is not None:
            await self.cancel_task(self._emit_task)
            self._emit_task = None
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()


__all__ = ["LipsyncVideoService", "FRAME_INDEX_KEY"]
