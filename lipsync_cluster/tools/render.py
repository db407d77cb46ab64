"""Render an audio file into a talking-avatar MP4 through the cluster (``lipsync-cluster render``).

The audio (any format ffmpeg reads: WAV, mp3, ogg, opus, m4a, flac..., any rate and channel count)
is decoded to 16 kHz mono (:mod:`.audio_file`), streamed through a
:class:`~lipsync_cluster.client.stream.StreamSession` (pipelined batches), and the frames are piped into the ffmpeg that the ``imageio-ffmpeg`` wheel ships, H.264 + the original
audio as AAC. The video has exactly ``round(seconds x 25)`` frames. No system ffmpeg is needed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np

from ..common.audio import FPS, SAMPLE_RATE
from ..common.errors import BadRequest
from ..common.infer_request import MAX_BATCH_SIZE, check_quality
from .audio_file import load_audio_16k

DEFAULT_BROKER = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")
PUSH_CHUNK_S = 1.0


def render_file(client, model_id: str, audio_path: str | os.PathLike, out_path: str | os.PathLike, *,
                format: str = "jpeg", quality: Optional[int] = None, batch_size: int = 5,
                max_in_flight: int = 4, video_quality: float = 7.0, progress: bool = True) -> dict:
    """Stream ``audio_path`` through ``model_id`` and write ``out_path`` (MP4, H.264 + AAC).

    Returns a summary: frames, seconds, wall time, realtime factor and the stream's latency.
    """
    import cv2
    import imageio_ffmpeg
    from tqdm import tqdm

    from ..client.stream import StreamSession, total_frames_for

    pcm = load_audio_16k(audio_path)
    total = total_frames_for(pcm.size)
    if total == 0:
        raise BadRequest(f"{audio_path}: shorter than one frame ({1000 / FPS:.0f} ms)", field="audio")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.part{os.getpid()}{out_path.suffix or '.mp4'}")
    t0 = time.monotonic()
    writer = None
    written = 0
    bar = tqdm(total=total, unit="frame", desc=f"render {model_id}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        with StreamSession(client, model_id, batch_size=batch_size, format=format, quality=quality,
                           max_in_flight=max_in_flight) as session:
            step = int(PUSH_CHUNK_S * SAMPLE_RATE)
            for i in range(0, pcm.size, step):
                session.push(pcm[i:i + step])
            session.close()
            for frame in session.frames(timeout=max(60.0, client.timeout)):
                image = frame.decode()
                if writer is None:
                    h, w = image.shape[:2]
                    writer = imageio_ffmpeg.write_frames(
                        str(tmp), (w, h), pix_fmt_in="rgb24", fps=FPS, codec="libx264", quality=video_quality,
                        macro_block_size=2, audio_path=str(audio_path), audio_codec="aac",
                        output_params=["-movflags", "+faststart"], ffmpeg_log_level="error")
                    writer.send(None)
                writer.send(np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)))
                written += 1
                bar.update(1)
            latency = session.latency()
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, out_path)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    wall = time.monotonic() - t0
    seconds = pcm.size / SAMPLE_RATE
    return {"out": str(out_path), "model_id": model_id, "frames": written, "expected_frames": total,
            "audio_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "realtime_factor": round(seconds / wall, 2) if wall else None,
            "latency_p50_ms": latency["p50_ms"], "latency_p99_ms": latency["p99_ms"], "retries": latency["retries"]}


@click.command("render")
@click.option("--model", "model_id", required=True, help="The avatar model id (see 'lipsync-cluster models').")
@click.option("--audio", "audio_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An audio file: WAV, mp3, ogg, opus, m4a, flac... (decoded to 16 kHz mono).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The MP4 to write.")
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True,
              help="How frames travel from the workers (png is lossless and larger).")
@click.option("--quality", type=int, default=None,
              help="jpeg quality 1..100 (default 85) / png compression 0..9 (checked against --format).")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=5, show_default=True,
              help="Frames per request.")
@click.option("--in-flight", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Batches in flight at once.")
@click.option("--broker", "endpoint", default=DEFAULT_BROKER, show_default=True, envvar="LIPSYNC_BROKER",
              help="The broker's client endpoint.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for one batch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def render(model_id: str, audio_path: str, out_path: str, fmt: str, quality: Optional[int], batch_size: int,
           in_flight: int, endpoint: str, timeout: float, quiet: bool) -> None:
    """Render AUDIO (any format ffmpeg reads) as MODEL speaking it, into an MP4 with the audio muxed in.

    \b
    Examples:
      lipsync-cluster render --model demo_ada --audio speech.wav --out talk.mp4
      lipsync-cluster render --model demo_ben --audio voice_44k_stereo.mp3 --out ben.mp4 --format png
    """
    from ..client import Client

    try:  # up front, by the request rules: not after decoding the audio and asking the cluster
        check_quality(fmt, quality)
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint="--quality") from None
    with Client(endpoint, timeout=timeout) as client:  # errors: one line (the CLI's command wrapper)
        summary = render_file(client, model_id, audio_path, out_path, format=fmt, quality=quality,
                              batch_size=batch_size, max_in_flight=in_flight, progress=not quiet)
    click.echo(f"✅ {summary['out']}: {summary['frames']} frames ({summary['audio_seconds']:.2f} s of audio) in "
               f"{summary['wall_seconds']:.1f} s ({summary['realtime_factor']}x real time); latency p50 "
               f"{summary['latency_p50_ms']:.0f} ms, p99 {summary['latency_p99_ms']:.0f} ms")


__all__ = ["render", "render_file", "load_audio_16k"]
