"""`lipsync-cluster render`: audio in any format (WAV, mp3, ogg, opus, m4a; any rate / channels) -> MP4 with the audio muxed in."""
from __future__ import annotations

import json
import re
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lipsync_cluster.tools.audio_file import ffmpeg_exe, load_audio_16k
from lipsync_cluster.cli import main
from lipsync_cluster.tools.render import render
from lipsync_cluster.common import imageops
from lipsync_cluster.common.errors import BadRequest
from lipsync_cluster.demo.light import mouth_open_pixels

pytestmark = pytest.mark.processes  # audio is decoded by ffmpeg (a subprocess); render needs a cluster


def write_wav(path, data: np.ndarray, rate: int, width: int) -> None:
    """Integer PCM WAV with the stdlib; ``data`` float in [-1, 1], [N] or [N, C]."""
    data = np.atleast_2d(data.T).T if data.ndim == 1 else data
    if width == 1:
        raw = np.clip(np.round(data * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 2:
        raw = np.round(data * 32767).astype("<i2").tobytes()
    elif width == 3:
        v = np.round(data * (2**23 - 1)).astype("<i4")
        raw = v.view(np.uint8).reshape(*v.shape, 4)[..., :3].tobytes()
    else:
        raw = np.round(data * (2**31 - 1)).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def ffmpeg_encode(samples: np.ndarray, rate: int, path: Path, *codec: str) -> Path:
    """Encode float samples [N, C] into ``path`` with the same ffmpeg binary that decodes them."""
    raw = np.ascontiguousarray(samples, np.float32)
    out = subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "f32le", "-ar", str(rate), "-ac", str(raw.shape[1]),
                          "-i", "pipe:0", *codec, str(path)], input=raw.tobytes(), capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    return path


def assert_is_the_tone(pcm: np.ndarray, seconds: float, freq: float = 440.0, rms_tol: float = 0.02) -> None:
    """16 kHz mono float32 of the tone: its length, its level (channels averaged) and its pitch."""
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(pcm.size - seconds * 16000) <= 0.06 * 16000, pcm.size  # lossy codecs pad a few ms
    body = pcm[2000:-2000]
    assert abs(np.sqrt(np.mean(body ** 2)) - 0.5 / np.sqrt(2)) < rms_tol
    spectrum = np.abs(np.fft.rfft(body))
    assert abs(np.argmax(spectrum) * 16000 / body.size - freq) < 5


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_of_every_integer_width_is_decoded_and_resampled(tmp_path, width):
    x = tone(0.5, 22050)
    path = tmp_path / f"t{width}.wav"
    write_wav(path, np.stack([x, x], axis=1), 22050, width)
    pcm = load_audio_16k(path)
    assert abs(pcm.size - 8000) <= 1
    assert_is_the_tone(pcm, 0.5)


@pytest.mark.parametrize("name,codec", [
    ("float.wav", ("-c:a", "pcm_f32le")),
    ("voice.mp3", ("-c:a", "libmp3lame", "-b:a", "128k")),
    ("voice.ogg", ("-c:a", "libvorbis")),
    ("voice.opus", ("-c:a", "libopus", "-b:a", "64k")),
    ("voice.m4a", ("-c:a", "aac", "-b:a", "128k")),
])
def test_compressed_formats_are_decoded_to_16k_mono(tmp_path, name, codec):
    """What a TTS engine hands over: 48 kHz stereo, one channel louder (averaged, not summed)."""
    x = tone(1.0, 48000)
    stereo = np.stack([x * 0.6, x * 1.4], axis=1)  # mean = x
    pcm = load_audio_16k(ffmpeg_encode(stereo, 48000, tmp_path / name, *codec))
    assert_is_the_tone(pcm, 1.0, rms_tol=0.03)


def test_unreadable_or_silent_files_are_refused_by_name(tmp_path):
    (tmp_path / "junk.mp3").write_bytes(b"not audio at all" * 100)
    with pytest.raises(BadRequest, match="junk.mp3: not a readable audio file"):
        load_audio_16k(tmp_path / "junk.mp3")
    with pytest.raises(BadRequest, match="no such audio file"):
        load_audio_16k(tmp_path / "missing.wav")
    # A video with no audio track.
    out = subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=64x64:d=0.2",
                          str(tmp_path / "mute.mp4")], capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    with pytest.raises(BadRequest, match="mute.mp4: .*no audio stream"):
        load_audio_16k(tmp_path / "mute.mp4")
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 16000, 2)
    with pytest.raises(BadRequest, match="empty.wav: the audio has no samples"):
        load_audio_16k(tmp_path / "empty.wav")


def probe(path) -> str:
    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True)
    return out.stderr


def test_render_writes_an_mp4_with_exact_frames_and_audio(make_cluster, tmp_path):
    import imageio_ffmpeg

    sup = make_cluster()
    rate, seconds = 44100, 2.5
    t = np.arange(int(rate * seconds)) / rate
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    noise = np.random.default_rng(0).standard_normal(t.size)
    env = (t >= 1.0) & (t < 2.0)  # silence, a 1 s voiced burst, silence
    x = 0.3 * env * (voiced / 3 + 0.2 * noise)
    wav = tmp_path / "speech.wav"
    write_wav(wav, np.stack([x, x], axis=1), rate, 2)
    out = tmp_path / "out" / "talk.mp4"
    result = CliRunner().invoke(render, ["--model", "demo_cleo", "--audio", str(wav), "--out", str(out),
                                         "--broker", sup.config.frontend])
    assert result.exit_code == 0, result.output
    assert "62 frames" in result.output and out.exists()
    info = probe(out)
    assert re.search(r"Video: h264.* 1280x720", info), info
    assert re.search(r"Audio: aac.* 44100 Hz, stereo", info), info
    n, secs = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert n == round(seconds * 25) == 62
    # the mouth opens in the burst and stays shut in the silence (decoded from the MP4)
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (1280, 720)
    frames = [np.frombuffer(f, np.uint8).reshape(720, 1280, 3)[:, :, ::-1] for f in reader]
    rects = json.loads((Path(sup.config.models_dir) / "demo_cleo" / "crop_rects.json").read_text())

    def opening(k):
        b = imageops.pingpong_index(k, 12)
        rect = rects[str(b)]["rect"] if isinstance(rects, dict) else rects[b]
        return mouth_open_pixels(imageops.crop_face(np.ascontiguousarray(frames[k]), rect)[4:324, 4:324])

    assert max(opening(k) for k in (5, 10, 15)) < 100
    assert min(opening(k) for k in (32, 37, 42)) > 500


def test_render_reports_a_missing_model_clearly(make_cluster, tmp_path):
    sup = make_cluster(cluster={"per_gpu": 1})
    wav = tmp_path / "s.wav"
    write_wav(wav, tone(1.0, 16000), 16000, 2)
    out = tmp_path / "x.mp4"
    # through the lipsync-cluster command, whose wrapper turns the server's error into one line
    result = CliRunner().invoke(main, ["render", "--model", "nobody", "--audio", str(wav), "--out", str(out),
                                       "--broker", sup.config.frontend, "--quiet"])
    assert result.exit_code != 0
    assert "unknown_model" in result.output and "nobody" in result.output
    assert not out.exists() and not list(tmp_path.glob(".x.part*"))
