"""LiveKit Agents: LipsyncVideoGenerator by its contract, through LiveKit's own AvatarRunner, no server.

The agent side is LiveKit's in-memory ``QueueAudioOutput`` (an AudioOutput and the runner's
AudioReceiver); the runner feeds the generator and pushes what it yields through its real
``rtc.AVSynchronizer`` (native audio and video sources, paced in real time). The only thing a room
would do, publishing the two tracks, is skipped (no LiveKit server here: none is packaged on PyPI,
npm or Debian). Checked: video frame then exactly its audio, sample for sample; AudioSegmentEnd right
after the segment's last audio frame, reported back as playback finished at the right position;
idle video with no audio while nothing is said; clear_buffer cuts video and audio together and is
reported as interrupted.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

RATE = 24000


@pytest.fixture(scope="module")
def lk() -> SimpleNamespace:
    """LiveKit's modules and the integration, imported when a test here runs rather than when the
    module is collected: livekit.agents takes over a second to import, in every xdist worker of
    `make test-fast`, while one of them runs these tests."""
    pytest.importorskip("livekit.agents", reason="the 'livekit' extra is not installed (pip install '.[livekit]')")
    from livekit import rtc
    from livekit.agents.voice import avatar

    from lipsync_cluster.integrations import livekit as integration

    return SimpleNamespace(rtc=rtc, avatar=avatar, integration=integration)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    x = 0.3 * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 1200 * t)) * (np.sin(2 * np.pi * 2 * t) > 0)
    return np.round(np.clip(x + 0.02 * rng.standard_normal(t.size), -1, 1) * 32767).astype(np.int16)


def recording_class(lk: SimpleNamespace) -> type:
    """Recording: the generator, recording what it hands the runner (the in-memory view of the two tracks)."""
    class Recording(_Recording, lk.integration.LipsyncVideoGenerator):
        pass

    return Recording


class _Recording:
    """Recording's own part, mixed in before LipsyncVideoGenerator (a LiveKit import away)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out: list = []
        self.changed = asyncio.Event()

    async def _iterate(self):
        async for x in super()._iterate():
            self.out.append(x)
            self.changed.set()
            yield x

    async def wait_for(self, cond, timeout: float = 60.0) -> None:
        async def loop():
            while not cond():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def count(self, kind) -> int:
        return sum(isinstance(x, kind) for x in self.out)


async def say(audio_out, pcm: np.ndarray) -> None:
    from livekit import rtc

    step = RATE // 50  # 20 ms frames, as LiveKit's TTS nodes send them
    for i in range(0, len(pcm), step):
        chunk = pcm[i:i + step]
        await audio_out.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, len(chunk)))
    audio_out.flush()


@pytest.mark.processes
def test_generator_through_the_avatar_runner(lk, make_cluster):
    rtc, avatar_options, Recording = lk.rtc, lk.integration.avatar_options, recording_class(lk)
    AudioSegmentEnd, AvatarRunner, QueueAudioOutput = (lk.avatar.AudioSegmentEnd, lk.avatar.AvatarRunner,
                                                       lk.avatar.QueueAudioOutput)
    sup = make_cluster()
    first, second = speechlike(2.0), speechlike(3.0, seed=1)

    async def run():
        gen = Recording("demo_ada", sample_rate=RATE, endpoint=sup.config.frontend,
                        session_options={"lookahead_frames": 4, "batch_size": 2})
        audio_out = QueueAudioOutput(sample_rate=RATE)
        runner = AvatarRunner(rtc.Room(), audio_recv=audio_out, video_gen=gen, options=avatar_options())
        runner._video_publication = True  # no server: the one step that needs a room (publishing) is skipped
        await runner.start()
        try:
            await say(audio_out, first)
            ev = await asyncio.wait_for(audio_out.wait_for_playout(), 60)
            n = -(-len(first) // 960)  # frames holding the first utterance
            assert not ev.interrupted and ev.playback_position == pytest.approx(n * 0.04)
            out = list(gen.out)
            video = [x for x in out if isinstance(x, rtc.VideoFrame)]
            audio = [x for x in out if isinstance(x, rtc.AudioFrame)]
            assert len(audio) == n and all(a.samples_per_channel == 960 and a.sample_rate == RATE for a in audio)
            pcm = np.concatenate([np.frombuffer(a.data, np.int16) for a in audio])
            assert np.array_equal(pcm[:len(first)], first) and not pcm[len(first):].any()
            assert all(v.width == 1280 and v.height == 720 and v.type == rtc.VideoBufferType.RGBA for v in video)
            # each audio frame right after its video frame; the segment's end right after the last
            for i, x in enumerate(out):
                if isinstance(x, rtc.AudioFrame):
                    assert isinstance(out[i - 1], rtc.VideoFrame)
            end = [i for i, x in enumerate(out) if isinstance(x, AudioSegmentEnd)]
            assert len(end) == 1 and out[end[0] - 1] is audio[-1]

            # idle: video keeps coming, without audio
            seen = len(gen.out)
            await gen.wait_for(lambda: gen.count(rtc.VideoFrame) >= len(video) + 10)
            assert not any(isinstance(x, rtc.AudioFrame) for x in gen.out[seen:])

            # barge-in in the second utterance
            speak = asyncio.create_task(say(audio_out, second))
            before = gen.count(rtc.AudioFrame)
            await gen.wait_for(lambda: gen.count(rtc.AudioFrame) >= before + 10)
            audio_out.clear_buffer()
            ev = await asyncio.wait_for(audio_out.wait_for_playout(), 60)
            await speak
            # what the runner had pushed to its synchronizer when the clear came (one frame may still be
            # on its way there): at most what was yielded
            assert ev.interrupted and 0.2 <= ev.playback_position <= (gen.count(rtc.AudioFrame) - before) * 0.04 + 1e-6
            cut = len(gen.out)
            await gen.wait_for(lambda: sum(isinstance(x, rtc.VideoFrame) for x in gen.out[cut:]) >= 15)
            tail = gen.out[cut:]
            assert not any(isinstance(x, (rtc.AudioFrame, AudioSegmentEnd)) for x in tail)
            said = gen.count(rtc.AudioFrame) - before
            assert 10 <= said < len(second) // 960 - 10  # the rest was never shown nor played
            assert gen.av.stats()["av"]["cuts"]
        finally:
            await runner.aclose()
            await gen.aclose()

    asyncio.run(run())


def test_avatar_token_names_the_room_and_the_agent(lk):
    import jwt

    avatar_token = lk.integration.avatar_token

    secret = "secret-secret-secret-secret-secret"
    token = avatar_token("key", secret, "room-1", "lipsync-avatar", on_behalf_of="agent-7")
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "lipsync-avatar" and claims["video"]["room"] == "room-1"
    assert claims["video"]["roomJoin"] and claims["video"]["canPublish"]
    assert claims["attributes"]["lk.publish_on_behalf"] == "agent-7"


def test_avatar_session_points_the_agents_audio_at_the_avatar(lk, monkeypatch):
    from livekit import rtc
    from livekit.agents import AgentSession
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from lipsync_cluster.integrations.livekit import LipsyncAvatarSession

    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)

    async def run():
        session = AgentSession()
        avatar = LipsyncAvatarSession("demo_ada", identity="avatar-1", launch=False)
        await avatar.start(session, rtc.Room())
        assert isinstance(session.output.audio, DataStreamAudioOutput)
        assert avatar.avatar_identity == "avatar-1" and avatar.provider == "lipsync-cluster"
        await avatar.aclose()
        with pytest.raises(ValueError, match="LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET"):
            await LipsyncAvatarSession("demo_ada").start(AgentSession(), rtc.Room())

    asyncio.run(run())
