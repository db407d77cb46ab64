"""A Python WebRTC viewer of the gateway (aiortc): offers, receives both tracks, talks on the data channel.

    viewer = Viewer("http://127.0.0.1:8086", "demo_ada", lookahead_frames=4)
    await viewer.connect()
    viewer.push(pcm_int16_16k)                 # binary PCM, as the WebSocket takes it
    viewer.control({"type": "interrupt"})
    ...; await viewer.close()

It records what a receiver can see: every video frame (arrival time, RTP timestamp, the frame
index when the gateway stamps it: ``webrtc_stamp``), every audio frame (arrival time, RTP
timestamp, samples), the sender reports (RTCP SR: RTP time <-> the sender's wall clock) and the
data channel's messages. Used by the tests and ``bench/webrtc.py``; needs the ``webrtc`` extra.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional, Sequence

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RtcpSrPacket

from .webrtc import read_stamp


class OfferRefused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status, self.body = status, body


class Viewer:
    def __init__(self, base_url: str, model: str, *, lookahead_frames: Optional[int] = None,
                 codecs: Sequence[str] = ("h264", "vp8"), read_index: bool = True, keep_audio: bool = False,
                 data_channel: bool = True, keep_every: int = 0, keep_rows: int = 120) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model
        self.lookahead_frames = lookahead_frames
        self.codecs = tuple(c.lower() for c in codecs)
        self.read_index = read_index
        self.keep_audio = keep_audio
        self.data_channel = data_channel
        self.keep_every, self.keep_rows = keep_every, keep_rows
        self.kept: dict[int, np.ndarray] = {}  # stamped index -> the picture's top rows (BGR), every keep_every-th
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel: Any = None
        self.video: list[tuple[float, int, Optional[int]]] = []  # (arrival, rtp pts, stamped index)
        self.audio: list[tuple[float, int, int]] = []  # (arrival, rtp pts, samples per channel)
        self.audio_pcm: list[np.ndarray] = []
        self.sr: dict[str, list[tuple[float, int]]] = {"video": [], "audio": []}  # (sender NTP s, rtp)
        self.messages: list[dict] = []
        self.rtp_origin: dict[str, int] = {}
        self.misordered = {"video": 0, "audio": 0}
        self.rtp_bytes = {"video": 0, "audio": 0}  # RTP payload received (retransmissions included)
        self.rtp_packets = {"video": 0, "audio": 0}
        self.answer: dict = {}
        self._tasks: list[asyncio.Task] = []
        self._open = asyncio.Event()
        self._message = asyncio.Event()
        self.errors: list[str] = []

    async def connect(self, timeout: float = 30.0) -> dict:
        pc = self.pc
        video = pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        caps = RTCRtpSender.getCapabilities("video").codecs
        prefs = [c for name in self.codecs for c in caps if c.mimeType.lower() == f"video/{name}"]
        video.setCodecPreferences(prefs + [c for c in caps if c.mimeType.lower() == "video/rtx"])
        if self.data_channel:
            self.channel = pc.createDataChannel("control")
            self.channel.on("open", self._open.set)
            self.channel.on("message", self._on_message)

        @pc.on("track")
        def on_track(track: Any) -> None:
            self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        body: dict = {"sdp": pc.localDescription.sdp, "type": "offer", "model": self.model}
        if self.lookahead_frames is not None:
            body["lookahead_frames"] = self.lookahead_frames
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base_url}/webrtc/offer", json=body) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise OfferRefused(resp.status, answer)
        self.answer = answer
        self._watch_reports()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        if self.channel is not None:
            await asyncio.wait_for(self._open.wait(), timeout)
        return answer

    def _watch_reports(self) -> None:
        """Record the sender reports: what maps RTP time to the sender's clock (lip sync in a browser)."""
        for t in self.pc.getTransceivers():
            receiver, kind = t.receiver, t.kind
            handle = receiver._handle_rtcp_packet  # aiortc has no public hook for SR

            async def wrapped(packet: Any, _handle=handle, _kind=kind) -> None:
                if isinstance(packet, RtcpSrPacket):
                    info = packet.sender_info
                    self.sr[_kind].append((info.ntp_timestamp / (1 << 32), info.rtp_timestamp))
                await _handle(packet)

            receiver._handle_rtcp_packet = wrapped
            handle_rtp = receiver._handle_rtp_packet

            async def wrapped_rtp(packet: Any, arrival_time_ms: int, _handle=handle_rtp, _kind=kind) -> None:
                # aiortc's frames count pts from the first RTP timestamp received: keep it
                self.rtp_origin.setdefault(_kind, packet.timestamp)
                self.rtp_bytes[_kind] += len(packet.payload)
                self.rtp_packets[_kind] += 1
                await _handle(packet, arrival_time_ms)

            receiver._handle_rtp_packet = wrapped_rtp

    async def _read(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if frame.pts >= 1 << 31:  # aiortc took a late (retransmitted) packet for an RTP wrap
                    self.misordered[track.kind] += 1
                    continue
                if track.kind == "video":
                    index = None
                    if self.read_index:
                        index = read_stamp(frame.to_ndarray(format="gray"))
                        if self.keep_every and index % self.keep_every == 0 and index not in self.kept:
                            self.kept[index] = frame.to_ndarray(format="bgr24")[:self.keep_rows].copy()
                    self.video.append((now, frame.pts, index))
                else:
                    self.audio.append((now, frame.pts, frame.samples))
                    if self.keep_audio:
                        self.audio_pcm.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].copy())
        except MediaStreamError:
            return
        except Exception as exc:  # noqa: BLE001 - recorded for the caller
            self.errors.append(f"{track.kind}: {type(exc).__name__}: {exc}")

    def _on_message(self, data: Any) -> None:
        if isinstance(data, str):
            self.messages.append(json.loads(data))
            self._message.set()

    def push(self, pcm: np.ndarray) -> None:
        """16 kHz mono int16 PCM, in messages of at most 2 s."""
        data = np.asarray(pcm, "<i2").tobytes()
        for i in range(0, len(data), 64000):
            self.channel.send(data[i:i + 64000])

    def control(self, message: dict) -> None:
        self.channel.send(json.dumps(message))

    async def wait_message(self, kind: str, timeout: float = 30.0, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[after:]:
                if m.get("type") == kind:
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no '{kind}' message within {timeout} s; got {[m.get('type') for m in self.messages]}")
            self._message.clear()
            try:
                await asyncio.wait_for(self._message.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def wait_frames(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.video) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.video)} video frames within {timeout} s, wanted {n}")
            await asyncio.sleep(0.02)

    async def wait_audio_covers_video(self, timeout: float = 60.0) -> None:
        """Until the audio received reaches the video tick received last when this was called (a
        starved receiver decodes the two tracks at different paces).

        The target is fixed at the call: while the call goes on, video keeps arriving, and the audio,
        which trails it by the receiver's jitter buffer, would chase a moving last tick for ever."""
        if not self.video:
            return
        target = (self.video[-1][1] - self.video[0][1]) / 3600 + 1
        deadline = time.monotonic() + timeout
        while len(self.audio) / 2 < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.audio) / 2} ticks of audio for the {target:.0f} video ticks "
                                   f"received when the wait began, after {timeout} s")
            await asyncio.sleep(0.02)

    async def packets_lost(self) -> dict[str, int]:
        """RTP packets the network lost, per track, as the receiver counts them (RTCP statistics)."""
        out = {}
        for t in self.pc.getTransceivers():
            stats = await t.receiver.getStats()
            out[t.kind] = sum(getattr(s, "packetsLost", 0) for s in stats.values() if s.type == "inbound-rtp")
        return out

    def indices(self) -> list[int]:
        """The stamped indices received, repeats (filler ticks) folded: continuous when nothing was lost."""
        out: list[int] = []
        for _, _, index in self.video:
            if index is not None and (not out or index != out[-1]):
                out.append(index)
        return out

    def av_offsets_ms(self) -> list[float]:
        """The A/V offset over the run, one value per video sender report, in ms (+: video late).

        Tick ``m`` is video RTP ``v0 + m x 3600`` and audio RTP ``a0 + m x 1920`` (``v0``, ``a0``: the
        first packets received, tick 0 of each track). A video report maps its RTP time (a tick) to the sender's wall clock;
        the audio report nearest in time maps the same tick's audio; the difference is how far apart
        the two leave the sender (what a browser's lip sync goes by).
        """
        sr_v = [s for s in self.sr["video"] if s[0] > 0]  # aiortc reports before its first packet: (0, 0)
        sr_a = [s for s in self.sr["audio"] if s[0] > 0]
        if not sr_v or not sr_a or len(self.rtp_origin) < 2:
            return []
        v0, a0 = self.rtp_origin["video"], self.rtp_origin["audio"]  # tick 0 of each track
        audio_sr = np.array(sr_a, dtype=np.float64)
        out = []
        for ntp_v, rtp_v in sr_v:
            tick = _rtp_diff(rtp_v, v0) / 3600
            ntp_a, rtp_a = sr_a[int(np.argmin(np.abs(audio_sr[:, 0] - ntp_v)))]
            t_a = ntp_a + _rtp_diff(a0 + round(tick * 1920) % (1 << 32), rtp_a) / 48000
            out.append((ntp_v - t_a) * 1000.0)
        return out

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _rtp_diff(a: int, b: int) -> int:
    """a - b on the 32-bit RTP clock."""
    d = (a - b) % (1 << 32)
    return d - (1 << 32) if d >= 1 << 31 else d


__all__ = ["Viewer", "OfferRefused"]
