"""LiveKit Agents: the self-hosted avatar shape, backed by a lipsync cluster.

Three parts, as LiveKit's own avatar plugins have them:

* :class:`LipsyncVideoGenerator`, a ``livekit.agents.voice.avatar.VideoGenerator``: ``push_audio``
  takes the agent's ``rtc.AudioFrame`` (and ``AudioSegmentEnd``), ``clear_buffer`` is barge-in,
  and iterating it yields, per video frame, an ``rtc.VideoFrame`` (RGBA) and, while there is speech,
  exactly that frame's audio as one ``rtc.AudioFrame``; ``AudioSegmentEnd`` right after the frame
  that plays a segment's last sample. While no audio comes it yields idle video frames (no audio:
  the agent's playback position counts its own audio only).
* :func:`run_avatar_worker`: joins a room and runs LiveKit's ``AvatarRunner`` with a
  ``DataStreamAudioReceiver`` and the generator: it publishes the avatar's video and audio tracks.
* :class:`LipsyncAvatarSession`, an ``AvatarSession`` for the agent side: it sends the agent's audio
  to the avatar (``DataStreamAudioOutput``) and, by default, starts the avatar worker in the agent's
  own process with a token it mints (``launch=False``: run the worker elsewhere, ``python -m
  lipsync_cluster.integrations.livekit --help``).

Needs the ``livekit`` extra (``pip install 'lipsync-cluster[livekit]'``). docs/INTEGRATIONS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections import deque
from typing import Any, AsyncIterator, Optional, Union

import numpy as np

from ..common.extras import MissingExtra

try:
    from livekit import api, rtc
    from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner, AvatarSession,
                                             DataStreamAudioOutput, DataStreamAudioReceiver, VideoGenerator)
except ModuleNotFoundError as exc:  # pragma: no cover - the message is the point
    raise MissingExtra("lipsync_cluster.integrations.livekit", "livekit", exc.name) from None

from ..client import AsyncClient
from ..client.av import AVFrame
from ..client.stream import IDLE_GRACE_S
from ..common.audio import FPS
from ._avatar import DEFAULT_ENDPOINT, AvatarStream, rgb

log = logging.getLogger("lipsync_cluster.livekit")

DEFAULT_IDENTITY = "lipsync-avatar"
DEFAULT_SAMPLE_RATE = 24000
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"  # livekit.agents.types: the agent's tracks


class LipsyncVideoGenerator(VideoGenerator):
    """A LiveKit ``VideoGenerator`` that lip-syncs through a lipsync cluster (see the module's doc).

    ``sample_rate``/``channels``: the audio it is pushed and yields (frames at another rate are
    resampled with ``rtc.AudioResampler``); ``session_options``: the stream's (``lookahead_frames`` 4,
    ``batch_size`` 2, ``format`` raw by default). The cluster session opens on first use, in the loop
    that iterates it.
    """

    def __init__(self, model_id: str, *, sample_rate: int = DEFAULT_SAMPLE_RATE, channels: int = 1,
                 endpoint: str = DEFAULT_ENDPOINT, client: Optional[AsyncClient] = None,
                 session_options: Optional[dict] = None, client_options: Optional[dict] = None,
                 listening: bool = True, idle_grace_s: float = IDLE_GRACE_S) -> None:
        self.sample_rate, self.channels = sample_rate, channels
        self._stream = AvatarStream(model_id, sample_rate, channels=channels, endpoint=endpoint, client=client,
                                    session_options=session_options, client_options=client_options,
                                    listening=listening, idle_grace_s=idle_grace_s)
        self._resamplers: dict[int, Any] = {}
        self._ends_now = 0  # segment ends whose last frame was out already: yielded before the next frame
        self._pending: deque = deque()

    @property
    def av(self):
        """The :class:`~lipsync_cluster.client.av.AsyncAVSession` (``switch``, ``stats`` ...)."""
        return self._stream.av

    async def push_audio(self, frame: Union["rtc.AudioFrame", AudioSegmentEnd]) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if self._stream.av.end_segment():
                self._ends_now += 1
            return
        if frame.num_channels != self.channels:
            raise ValueError(f"audio has {frame.num_channels} channel(s); this generator takes {self.channels}")
        frames = [frame]
        if frame.sample_rate != self.sample_rate:
            r = self._resamplers.get(frame.sample_rate)
            if r is None:
                r = self._resamplers[frame.sample_rate] = rtc.AudioResampler(
                    frame.sample_rate, self.sample_rate, num_channels=self.channels)
            frames = r.push(frame)
        for f in frames:
            self._stream.av.push(np.frombuffer(f.data, np.int16).reshape(-1, self.channels))

    def clear_buffer(self) -> None:
        """Barge-in: the frames not yet yielded and the audio not yet turned into frames are dropped."""
        self._stream.av.interrupt()
        self._pending.clear()
        self._ends_now = 0  # the runner reports the interrupted segment itself
        self._resamplers.clear()  # no tail of the cut segment in the next one

    def _frames_of(self, item: AVFrame) -> list:
        image = rgb(item.frame)
        h, w = image.shape[:2]
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[:, :, :3] = image
        rgba[:, :, 3] = 255
        out: list = [rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes())]
        if item.speech:
            out.append(rtc.AudioFrame(item.audio.tobytes(), item.sample_rate, self.channels, item.num_samples))
        out.extend(AudioSegmentEnd() for _ in range(item.segment_ends))
        return out

    async def _iterate(self) -> AsyncIterator[Union["rtc.VideoFrame", "rtc.AudioFrame", AudioSegmentEnd]]:
        av = self._stream.av
        while True:
            while self._ends_now:
                self._ends_now -= 1
                yield AudioSegmentEnd()
            if not self._pending:
                item = await av.get()
                if item is None:
                    return
                self._pending.extend(self._frames_of(item))
            # one at a time: a clear_buffer() between two yields drops the rest of the frame's output
            yield self._pending.popleft()

    def __aiter__(self) -> AsyncIterator[Union["rtc.VideoFrame", "rtc.AudioFrame", AudioSegmentEnd]]:
        return self._iterate()

    async def aclose(self) -> None:
        await self._stream.aclose()


def avatar_options(width: int = 1280, height: int = 720, sample_rate: int = DEFAULT_SAMPLE_RATE,
                   channels: int = 1) -> "AvatarOptions":
    """The ``AvatarRunner`` options for the cluster's frames (25 fps; the models' frame size)."""
    return AvatarOptions(video_width=width, video_height=height, video_fps=FPS, audio_sample_rate=sample_rate,
                         audio_channels=channels)


async def run_avatar_worker(url: str, token: str, model_id: str, *, endpoint: str = DEFAULT_ENDPOINT,
                            sample_rate: int = DEFAULT_SAMPLE_RATE, width: int = 1280, height: int = 720,
                            session_options: Optional[dict] = None, room: Optional["rtc.Room"] = None) -> None:
    """Join the room with ``token`` and publish the avatar until the room disconnects.

    The agent sends audio with ``DataStreamAudioOutput(room, destination_identity=<this token's
    identity>)`` (what :class:`LipsyncAvatarSession` does).
    """
    room = room or rtc.Room()
    await room.connect(url, token)
    gen = LipsyncVideoGenerator(model_id, sample_rate=sample_rate, endpoint=endpoint,
                                session_options=session_options)
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room), video_gen=gen,
                          options=avatar_options(width, height, sample_rate))
    done = asyncio.Event()
    room.on("disconnected", lambda *_: done.set())
    try:
        await runner.start()
        await done.wait()
    finally:
        await runner.aclose()
        await gen.aclose()
        await room.disconnect()


def avatar_token(api_key: str, api_secret: str, room_name: str, identity: str = DEFAULT_IDENTITY,
                 on_behalf_of: Optional[str] = None) -> str:
    """A token for the avatar participant: join ``room_name``, publish; its tracks stand for ``on_behalf_of``."""
    token = (api.AccessToken(api_key, api_secret).with_identity(identity).with_name("avatar")
             .with_kind("agent")
             .with_grants(api.VideoGrants(room_join=True, room=room_name, can_publish=True, can_subscribe=True,
                                          can_publish_data=True)))
    if on_behalf_of:
        token = token.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: on_behalf_of})
    return token.to_jwt()


class LipsyncAvatarSession(AvatarSession):
    """The agent side: ``await avatar.start(session, room=ctx.room)`` before ``session.start(...)``.

    It points the agent's audio output at the avatar participant and, with ``launch=True`` (the
    default), runs :func:`run_avatar_worker` in this process with a token minted from
    ``LIVEKIT_URL``/``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET`` (or the arguments).
    """

    def __init__(self, model_id: str, *, endpoint: str = DEFAULT_ENDPOINT, identity: str = DEFAULT_IDENTITY,
                 sample_rate: int = DEFAULT_SAMPLE_RATE, launch: bool = True, livekit_url: Optional[str] = None,
                 api_key: Optional[str] = None, api_secret: Optional[str] = None,
                 session_options: Optional[dict] = None) -> None:
        super().__init__()
        self.model_id, self.endpoint, self.identity = model_id, endpoint, identity
        self.sample_rate, self.launch = sample_rate, launch
        self.livekit_url = livekit_url or os.environ.get("LIVEKIT_URL")
        self.api_key = api_key or os.environ.get("LIVEKIT_API_KEY")
        self.api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET")
        self.session_options = session_options
        self._worker: Optional[asyncio.Task] = None

    @property
    def avatar_identity(self) -> str:
        return self.identity

    @property
    def provider(self) -> str:
        return "lipsync-cluster"

    async def start(self, agent_session: Any, room: "rtc.Room") -> None:
        if self.launch:  # checked before anything is attached to the session
            missing = [n for n, v in (("LIVEKIT_URL", self.livekit_url), ("LIVEKIT_API_KEY", self.api_key),
                                      ("LIVEKIT_API_SECRET", self.api_secret)) if not v]
            if missing:
                raise ValueError(f"launching the avatar worker needs {', '.join(missing)} (environment or "
                                 "arguments), or launch=False with the worker started elsewhere")
        await super().start(agent_session, room)
        if self.launch:
            token = avatar_token(self.api_key, self.api_secret, room.name, self.identity,
                                 on_behalf_of=room.local_participant.identity)
            self._worker = asyncio.create_task(run_avatar_worker(
                self.livekit_url, token, self.model_id, endpoint=self.endpoint, sample_rate=self.sample_rate,
                session_options=self.session_options), name="lipsync-avatar-worker")
        agent_session.output.audio = DataStreamAudioOutput(
            room, destination_identity=self.identity, sample_rate=self.sample_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO)

    async def aclose(self) -> None:
        await super().aclose()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None


def main(argv: Optional[list] = None) -> None:
    """``python -m lipsync_cluster.integrations.livekit``: run the avatar worker for one room."""
    p = argparse.ArgumentParser(prog="python -m lipsync_cluster.integrations.livekit",
                                description="Join a LiveKit room as the avatar: receive the agent's audio "
                                            "(data stream), publish lip-synced video and the same audio.")
    p.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server (env LIVEKIT_URL)")
    p.add_argument("--room", required=True, help="the room to join")
    p.add_argument("--model", required=True, help="the avatar's model id on the cluster")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"the cluster's broker (default {DEFAULT_ENDPOINT})")
    p.add_argument("--identity", default=DEFAULT_IDENTITY, help=f"participant identity (default {DEFAULT_IDENTITY})")
    p.add_argument("--on-behalf-of", default=None, help="the agent's identity (its tracks stand for the agent)")
    p.add_argument("--sample-rate", type=int, default=DEFAULT_SAMPLE_RATE, help="audio rate (default 24000)")
    p.add_argument("--lookahead-frames", type=int, default=4, help="0..12 (default 4; docs/STREAMING.md)")
    args = p.parse_args(argv)
    key, secret = os.environ.get("LIVEKIT_API_KEY"), os.environ.get("LIVEKIT_API_SECRET")
    if not (args.url and key and secret):
        p.error("needs --url (or LIVEKIT_URL), LIVEKIT_API_KEY and LIVEKIT_API_SECRET in the environment")
    token = avatar_token(key, secret, args.room, args.identity, args.on_behalf_of)
    asyncio.run(run_avatar_worker(args.url, token, args.model, endpoint=args.endpoint, sample_rate=args.sample_rate,
                                  session_options={"lookahead_frames": args.lookahead_frames}))


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["LipsyncVideoGenerator", "LipsyncAvatarSession", "run_avatar_worker", "avatar_token", "avatar_options"]
