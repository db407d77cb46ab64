"""Audio files in any format, as the cluster hears them: 16 kHz mono float32 in [-1, 1].

Decoded by the ffmpeg binary that the ``imageio-ffmpeg`` wheel ships (the 'tools' extra), so WAV of
any sample type, mp3, ogg/vorbis, opus, m4a/aac, flac and the audio track of a video all work with
no system ffmpeg. ffmpeg resamples to 16 kHz and hands over float32 WAV on a pipe, keeping the
file's channels; they are averaged here (ffmpeg's own stereo-to-mono mix is -3 dB per channel, which
makes two equal channels 3 dB louder and can push a loud file past full scale).
"""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np

from ..common.audio import SAMPLE_RATE
from ..common.errors import BadRequest

# ffmpeg decodes hours of audio in seconds; a process that takes longer than this is stuck.
DECODE_TIMEOUT_S = 600.0
_FLOAT32 = 3          # WAVE_FORMAT_IEEE_FLOAT
_EXTENSIBLE = 0xFFFE  # WAVE_FORMAT_EXTENSIBLE (ffmpeg's choice beyond two channels)


def ffmpeg_exe() -> str:
    """The ffmpeg binary of the imageio-ffmpeg wheel."""
    import imageio_ffmpeg  # noqa: PLC0415 - the 'tools' extra

    return imageio_ffmpeg.get_ffmpeg_exe()


def load_audio_16k(path: str | os.PathLike) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono 16 kHz samples in [-1, 1].

    Raises :class:`BadRequest` (field ``audio``) when the file is missing, is not audio ffmpeg can
    decode, has no audio stream, or has no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise BadRequest(f"{path}: no such audio file", field="audio")
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
           "-ar", str(SAMPLE_RATE), "-c:a", "pcm_f32le", "-map_metadata", "-1", "-f", "wav", "pipe:1"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=DECODE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BadRequest(f"{path}: decoding took over {DECODE_TIMEOUT_S:.0f} s", field="audio") from None
    if out.returncode != 0:
        said = out.stderr.decode(errors="replace").strip()
        why = "the file has no audio stream" if "matches no streams" in said else \
            (said.splitlines() or ["ffmpeg failed"])[-1]
        raise BadRequest(f"{path}: not a readable audio file ({why})", field="audio")
    samples, channels = _read_float_wav(out.stdout, path)
    if samples.size == 0:
        raise BadRequest(f"{path}: the audio has no samples", field="audio")
    if channels > 1:
        samples = samples[: samples.size // channels * channels].reshape(-1, channels).mean(axis=1)
    return np.clip(np.nan_to_num(samples), -1.0, 1.0).astype(np.float32)


def _read_float_wav(data: bytes, path: Path) -> tuple[np.ndarray, int]:
    """Samples (interleaved) and channel count of the float32 WAV ffmpeg wrote to a pipe.

    Written to a pipe, the RIFF and data sizes cannot be filled in afterwards: the data runs to the end.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BadRequest(f"{path}: ffmpeg did not produce WAV audio", field="audio")
    pos, channels = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt, channels, rate = struct.unpack_from("<HHI", data, body)
            bits = struct.unpack_from("<H", data, body + 14)[0]
            if fmt not in (_FLOAT32, _EXTENSIBLE) or bits != 32 or rate != SAMPLE_RATE or channels < 1:
                raise BadRequest(f"{path}: unexpected decoder output (format {fmt}, {bits} bit, {rate} Hz)",
                                 field="audio")
        elif chunk == b"data":
            if not channels:
                break
            end = len(data) if size in (0, 0xFFFFFFFF) or body + size > len(data) else body + size
            end -= (end - body) % 4
            return np.frombuffer(data, "<f4", count=(end - body) // 4, offset=body), channels
        pos = body + size + (size & 1)
    raise BadRequest(f"{path}: ffmpeg's WAV output has no audio data", field="audio")


__all__ = ["load_audio_16k", "ffmpeg_exe", "DECODE_TIMEOUT_S"]
