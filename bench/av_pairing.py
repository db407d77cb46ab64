"""CPU cost of pairing frames with the caller's audio (lipsync_cluster/client/av.py), per second of audio.

For each caller rate (16, 22.05, 24, 44.1, 48 kHz), 60 s of speech-like int16 audio is pushed into
an AVCore in 20 ms chunks (as TTS services send it); every frame is paired as soon as its 16 kHz
audio is there. Measured: process CPU time per second of audio (resampling to 16 kHz + pairing),
as the median of 5 runs, and that as a share of one core at real time. No cluster: this is the
client-side cost an integration (Pipecat, LiveKit, WebRTC) adds per session.

    python bench/av_pairing.py            # prints the table and writes docs/BENCHMARKS.md "A/V pairing"
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_section  # noqa: E402

from lipsync_cluster.client.av import AVCore  # noqa: E402
from lipsync_cluster.client.stream import StreamFrame  # noqa: E402

RATES = (16000, 22050, 24000, 44100, 48000)
SECONDS = 60
RUNS = 5


def speech(rate: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(rate * SECONDS) / rate
    x = 0.3 * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 1200 * t)) * (np.sin(2 * np.pi * 2 * t) > 0)
    return np.round(np.clip(x + 0.02 * rng.standard_normal(t.size), -1, 1) * 32767).astype(np.int16)


def one_run(rate: int, pcm: np.ndarray) -> float:
    core = AVCore(rate, listening=False)
    step = rate // 50
    k = 0
    t0 = time.process_time()
    for i in range(0, len(pcm), step):
        core.push(pcm[i:i + step])
        while core.n16 >= 640 * (k + 1):
            core.pair(StreamFrame(k, k / 25, 0, "m", "v", "raw", None, [0, 0, 1, 1], "w", 0.0))
            k += 1
    cpu = time.process_time() - t0
    assert k == SECONDS * 25
    return cpu


def main() -> None:
    rows = []
    for rate in RATES:
        pcm = speech(rate)
        cpu = statistics.median(one_run(rate, pcm) for _ in range(RUNS))
        ms = 1000 * cpu / SECONDS
        rows.append((rate, ms))
        print(f"{rate} Hz: {ms:.2f} ms CPU per second of audio ({ms / 10:.2f} % of a core)", flush=True)
    load = os.getloadavg()[0]
    body = [
        "## A/V pairing (`bench/av_pairing.py`)",
        "",
        f"{machine()}; {today()}; load average {load:.1f} when it ran (2 shared cores: the absolute",
        "numbers are upper bounds). `python bench/av_pairing.py`: 60 s of int16 audio pushed into `AVCore` in 20 ms",
        "chunks, every frame paired; process CPU per second of audio, median of 5 runs. This is what an",
        "integration (Pipecat, LiveKit, WebRTC) adds on the client per session, on top of the stream.",
        "",
        "| caller rate | CPU per audio second | share of one core |",
        "|---|---|---|",
    ]
    body += [f"| {rate} Hz | {ms:.2f} ms | {ms / 10:.2f} % |" for rate, ms in rows]
    write_section("av", "\n".join(body))


if __name__ == "__main__":
    main()
