"""Tests of lipsync_cluster.common.audio against independent references (librosa, hand math)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from lipsync_cluster.common import audio as A
from lipsync_cluster.common.errors import BadRequest

librosa = pytest.importorskip("librosa")

SR = 16000


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-ish test clip: a few tones with a slow envelope plus noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t)
    x = (0.3 * env * np.sin(2 * np.pi * 220 * t)
         + 0.15 * np.sin(2 * np.pi * 1234 * t + 0.3)
         + 0.1 * np.sin(2 * np.pi * 3700 * t) * (1 - env)
         + 0.05 * rng.standard_normal(t.size))
    return x.astype(np.float32)


def _reference_mel(x: np.ndarray) -> np.ndarray:
    """The SyncTalk_2D front end written out with librosa, independently of the module."""
    x = x.astype(np.float64)
    y = np.concatenate([x[:1], x[1:] - 0.97 * x[:-1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns on clips shorter than n_fft
        spec = np.abs(librosa.stft(y, n_fft=800, hop_length=200, win_length=800, window="hann",
                                   center=True, pad_mode="reflect"))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600,
                                dtype=np.float64)
    db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4)


class _RecordingEncoder:
    """A real (deterministic, content-dependent) encoder: a fixed linear map of the mel window.

    Different mel windows give different 512-vectors, so a window built from the wrong
    position is detectable; every call's input shape is recorded.
    """

    def __init__(self) -> None:
        self.proj = np.random.default_rng(42).standard_normal((80 * 16, 512))
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32
        self.calls.append(x.shape)
        # float64 accumulation: BLAS sums float32 in an order that depends on the batch size,
        # so the same window encoded in a batch of 18 or of 40 would differ in the last bits.
        return (x.reshape(x.shape[0], -1).astype(np.float64) @ self.proj).astype(np.float32)


# --------------------------------------------------------------------------- constants


def test_constants_match_the_model_family():
    assert (A.SAMPLE_RATE, A.FPS, A.N_FFT, A.HOP, A.WIN, A.N_MELS) == (16000, 25, 800, 200, 800, 80)
    assert (A.FMIN, A.FMAX, A.PREEMPHASIS, A.MEL_STEP) == (55, 7600, 0.97, 16)
    assert (A.CONTEXT_BEFORE, A.CONTEXT_AFTER, A.SAMPLES_PER_FRAME) == (8, 7, 640)


# --------------------------------------------------------------------------- to_float_pcm


def test_int16_is_scaled_by_32768():
    x = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
    y = A.to_float_pcm(x)
    assert y.dtype == np.float32 and y.shape == (5,)
    np.testing.assert_array_equal(y, np.array([-1.0, -0.5, 0.0, 0.5, 32767 / 32768], np.float32))


def test_float_pcm_passes_through_as_float32():
    x = np.linspace(-1, 1, 101)  # float64
    y = A.to_float_pcm(x)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, x, atol=1e-7)


@pytest.mark.parametrize("shape", [(100, 1), (1, 100)])
def test_column_or_row_vector_is_squeezed(shape):
    x = np.arange(100, dtype=np.float32).reshape(shape) / 100
    y = A.to_float_pcm(x)
    assert y.shape == (100,)
    np.testing.assert_array_equal(y, np.arange(100, dtype=np.float32) / 100)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_rejected_naming_the_field(bad):
    x = np.zeros(50, dtype=np.float32)
    x[7] = bad
    with pytest.raises(BadRequest, match="audio_pcm.*non-finite"):
        A.to_float_pcm(x)
    with pytest.raises(BadRequest, match="^my_field"):
        A.to_float_pcm(x, field="my_field")


def test_out_of_range_floats_are_rejected_with_the_peak():
    x = np.array([0.1, -3.2, 0.5], dtype=np.float32)
    with pytest.raises(BadRequest, match=r"audio_pcm float samples must lie in \[-1, 1\]; max \|x\| was 3.2"):
        A.to_float_pcm(x)


def test_rounding_overshoot_is_clipped_not_rejected():
    y = A.to_float_pcm(np.array([1.00005, -1.00005, 0.25]))
    np.testing.assert_array_equal(y, np.array([1.0, -1.0, 0.25], np.float32))


@pytest.mark.parametrize("x, pattern", [
    (np.zeros(0, np.float32), "audio_pcm is empty"),
    (np.zeros((10, 2), np.float32), r"audio_pcm must be 1-D.*\[10, 2\]"),
    (np.zeros((2, 2, 2), np.float32), "audio_pcm must be 1-D"),
    (np.zeros(10, np.int32), "audio_pcm must be int16, float32 or float64; got dtype int32"),
])
def test_malformed_pcm_is_rejected(x, pattern):
    with pytest.raises(BadRequest, match=pattern) as info:
        A.to_float_pcm(x)
    assert info.value.code == "bad_request"


# --------------------------------------------------------------------------- mel


def test_filterbank_equals_librosa():
    ours = A.mel_filterbank()
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600,
                              dtype=np.float64)
    assert ours.shape == (80, 401)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    # Cached, and shared read-only so nobody can corrupt it for everyone else.
    assert A.mel_filterbank() is ours and not ours.flags.writeable


def test_melspectrogram_equals_librosa_reference():
    x = _signal(4.0)
    mel = A.melspectrogram(x)
    ref = _reference_mel(x)
    assert mel.dtype == np.float32
    assert mel.shape == ref.shape == (80, 1 + x.size // 200)
    np.testing.assert_allclose(mel, ref, rtol=0, atol=1e-4)
    # The clip is not degenerate: the comparison covers a wide range of values.
    assert mel.min() < -2 and mel.max() > 1


@pytest.mark.parametrize("n", [1, 150, 399, 400, 401, 799, 800, 801, 3333])
def test_melspectrogram_short_and_odd_lengths(n):
    # Covers the reflect padding when the clip is shorter than the 400-sample pad.
    x = _signal(1.0, seed=n)[:n]
    mel = A.melspectrogram(x)
    assert mel.shape == (80, 1 + n // 200)
    np.testing.assert_allclose(mel, _reference_mel(x), rtol=0, atol=1e-4)


def test_int16_input_gives_the_same_mel_as_scaled_floats():
    x16 = (_signal(1.0) * 32767).astype(np.int16)
    np.testing.assert_allclose(A.melspectrogram(x16),
                               A.melspectrogram(x16.astype(np.float32) / 32768), atol=1e-6)


def test_silence_is_minus_four_everywhere():
    mel = A.melspectrogram(np.zeros(16000, np.float32))
    # mel = 0 -> floor 1e-5 -> -100 dB - 20 -> 8*(-20)/100 - 4 < -4 -> clipped to -4.
    assert mel.shape == (80, 81)
    assert np.all(mel == -4.0)


def test_loud_tone_lights_up_its_own_mel_bins():
    t = np.arange(SR) / SR
    freq = 1000.0
    mel = A.melspectrogram((0.8 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
    profile = mel[:, 10:-10].mean(axis=1)  # away from the edges
    # The filter with the largest weight at 1 kHz is where the energy must be.
    fft_bin = int(round(freq * 800 / SR))
    expected = int(np.argmax(A.mel_filterbank()[:, fft_bin]))
    assert abs(int(np.argmax(profile)) - expected) <= 1
    assert profile[expected] > 2.0  # loud: far above silence (-4)
    assert profile[expected] - profile[70:].mean() > 3.0  # and far above the 5+ kHz bins


# The mel's speed is a benchmark, not a test: bench/pipeline.py --stages and bench/stages.py time
# the PCM features per frame (the "pcm features" column).


# --------------------------------------------------------------------------- encoder_inputs


def _index_mel(n_cols: int) -> np.ndarray:
    """A mel whose column c holds the value c, so a window says which columns it took."""
    return np.tile(np.arange(n_cols, dtype=np.float32), (80, 1))


def test_encoder_inputs_start_column_is_int_80p_over_25():
    mel = _index_mel(500)
    positions = [0, 1, 2, 3, 4, 5, 7, 13, 24, 25, 99]
    out = A.encoder_inputs(mel, positions)
    assert out.shape == (len(positions), 1, 80, 16) and out.dtype == np.float32
    for k, p in enumerate(positions):
        start = int(80 * p / 25)
        np.testing.assert_array_equal(out[k, 0], np.tile(np.arange(start, start + 16), (80, 1)))
    # Spot values: 3.2 columns per frame, truncated.
    assert [int(out[k, 0, 0, 0]) for k in range(5)] == [0, 3, 6, 9, 12]


def test_encoder_inputs_keeps_mel_rows_in_order():
    mel = np.arange(80 * 40, dtype=np.float32).reshape(80, 40)
    out = A.encoder_inputs(mel, [2])
    np.testing.assert_array_equal(out[0, 0], mel[:, 6:22])


def test_encoder_inputs_clamps_at_the_end_of_the_clip():
    mel = _index_mel(40)  # positions >= 8 would run past column 40
    out = A.encoder_inputs(mel, [7, 8, 11, 100])
    assert out[0, 0, 0, 0] == 22  # int(3.2*7) = 22, 22+16 = 38 <= 40: not clamped
    for k in (1, 2, 3):
        np.testing.assert_array_equal(out[k, 0, 0], np.arange(24, 40))  # start = T-16


def test_encoder_inputs_pads_short_mel_by_repeating_last_column():
    mel = _index_mel(5)
    out = A.encoder_inputs(mel, [0, 3])
    expected = np.array([0, 1, 2, 3, 4] + [4] * 11, dtype=np.float32)
    for k in range(2):
        np.testing.assert_array_equal(out[k, 0], np.tile(expected, (80, 1)))


# --------------------------------------------------------------------------- unet_windows


def test_unet_windows_rows_clamp_and_reshape_order():
    n = 30
    encoded = np.repeat(np.arange(n, dtype=np.float32)[:, None], 512, axis=1)  # row i == i
    positions = [0, 3, 15, 28, 29]
    win = A.unet_windows(encoded, positions)
    assert win.shape == (5, 32, 16, 16) and win.dtype == np.float32
    for b, p in enumerate(positions):
        rows = win[b].reshape(16, 512)
        expected = [max(0, min(n - 1, p - 8 + k)) for k in range(16)]
        assert rows[:, 0].tolist() == expected
        assert np.all(rows == rows[:, :1])  # each row is one encoder output, untouched
    # C-order reshape: (32,16,16) plane j holds half of row j//2 (512 = 2 x 16 x 16).
    p = 15
    assert win[2, 0, 0, 0] == p - 8 and win[2, 1, 15, 15] == p - 8
    assert win[2, 2, 0, 0] == p - 7 and win[2, 31, 15, 15] == p + 7


def test_unet_windows_preserves_feature_layout():
    rng = np.random.default_rng(1)
    encoded = rng.standard_normal((20, 512)).astype(np.float32)
    win = A.unet_windows(encoded, [10])
    np.testing.assert_array_equal(win[0].reshape(-1), encoded[2:18].reshape(-1))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("samples, frames", [(0, 0), (1, 1), (639, 1), (640, 1), (641, 2),
                                              (6400, 10), (16000, 25)])
def test_frames_covered_is_ceil(samples, frames):
    assert A.frames_covered(samples) == frames


def test_pcm_span_for_batch():
    assert A.pcm_span_for_batch(100, 5) == (91, 117)
    assert A.pcm_span_for_batch(3, 5) == (0, 20)  # clamped at 0
    assert A.pcm_span_for_batch(100, 5, total_frames=110) == (91, 110)
    assert A.pcm_span_for_batch(100, 5, total_frames=1000) == (91, 117)
    with pytest.raises(BadRequest, match="batch_size"):
        A.pcm_span_for_batch(0, 0)
    with pytest.raises(BadRequest, match="start_frame_idx"):
        A.pcm_span_for_batch(-1, 3)
    with pytest.raises(BadRequest, match="start_frame_idx.*past"):
        A.pcm_span_for_batch(50, 3, total_frames=50)


@pytest.mark.parametrize("start, batch", [(9, 1), (37, 5), (60, 25), (0, 5), (3, 5)])
def test_span_slices_reproduce_whole_clip_windows(start, batch):
    # A stateless worker given only the span's PCM must compute what a whole-clip pass would.
    pcm = _signal(120 * 640 / SR, seed=11)
    enc = _RecordingEncoder()
    frames = list(range(start, start + batch))
    whole = A.features_from_pcm(pcm, enc, 0, frames)
    first, end = A.pcm_span_for_batch(start, batch, total_frames=A.frames_covered(len(pcm)))
    part = A.features_from_pcm(pcm[first * 640:end * 640], enc, first, frames)
    np.testing.assert_allclose(part, whole, atol=1e-5)


def test_features_from_pcm_matches_full_pipeline_and_encodes_only_needed_positions():
    pcm = _signal(40 * 640 / SR, seed=3)  # exactly 40 video frames
    offset = 100
    frames = [110, 111, 112]
    enc = _RecordingEncoder()
    feats = A.features_from_pcm(pcm, enc, offset, frames)
    assert feats.shape == (3, 32, 16, 16) and feats.dtype == np.float32
    # One encoder call, on positions 2..19 (10-8 .. 12+7), each once.
    assert enc.calls == [(18, 1, 80, 16)]
    # Same as encoding every frame of the span and windowing with unet_windows.
    full = _RecordingEncoder()(A.encoder_inputs(A.melspectrogram(pcm), np.arange(40)))
    np.testing.assert_allclose(feats, A.unet_windows(full, [10, 11, 12]), rtol=1e-6, atol=1e-5)
    # Each frame has its own window: consecutive frames shift by one encoder row.
    assert not np.allclose(feats[0], feats[1])
    np.testing.assert_array_equal(feats[0].reshape(16, 512)[1:], feats[1].reshape(16, 512)[:-1])


@pytest.mark.parametrize("start", [100, 101, 102, 103, 104])
def test_streamed_features_equal_whole_clip_features_for_any_offset(start):
    # The mel is aligned to the stream's absolute 200-sample grid, so a span that starts at
    # any frame (640*offset is on the grid only when offset % 5 == 0) gives the same windows
    # as the whole clip, given 1 frame of extra audio before and 4 after the UNet context.
    pcm = _signal(6.0, seed=7)
    n = A.frames_covered(pcm.size)
    enc = _RecordingEncoder()
    full = A.unet_windows(enc(A.encoder_inputs(A.melspectrogram(pcm), np.arange(n))),
                          np.arange(n))
    first, end = start - 9, start + 5 + 12
    part = A.features_from_pcm(pcm[first * 640:end * 640], enc, first, range(start, start + 5))
    np.testing.assert_allclose(part, full[start:start + 5], rtol=0,
                               atol=1e-5 * np.abs(full).max())


def test_features_from_pcm_span_shorter_than_grid_shift():
    # offset 1 starts 160 samples before the next mel grid point; 100 samples never reach it.
    enc = _RecordingEncoder()
    feats = A.features_from_pcm(_signal(100 / SR), enc, 1, [1])
    assert feats.shape == (1, 32, 16, 16) and np.isfinite(feats).all()
    assert enc.calls == [(1, 1, 80, 16)]


def test_features_from_pcm_clamps_windows_at_the_span_edges():
    pcm = (_signal(10 * 640 / SR, seed=4) * 32767).astype(np.int16)  # 10 frames, int16
    enc = _RecordingEncoder()
    feats = A.features_from_pcm(pcm, enc, 0, [0, 9])
    assert enc.calls == [(10, 1, 80, 16)]  # rows clamp into 0..9; all 10 needed
    full = _RecordingEncoder()(A.encoder_inputs(A.melspectrogram(pcm), np.arange(10)))
    rows0 = feats[0].reshape(16, 512)
    rows9 = feats[1].reshape(16, 512)
    for k in range(8):  # frame 0: rows -8..-1 repeat row 0
        np.testing.assert_allclose(rows0[k], full[0], atol=1e-5)
    for k in range(10, 16):  # frame 9: rows 10..16 repeat row 9
        np.testing.assert_allclose(rows9[k], full[9], atol=1e-5)


def test_features_from_pcm_partial_last_frame_is_covered():
    pcm = _signal((5 * 640 + 1) / SR)  # 5 frames and 1 sample -> covers 6 frames
    enc = _RecordingEncoder()
    assert A.features_from_pcm(pcm, enc, 20, [25]).shape == (1, 32, 16, 16)
    with pytest.raises(BadRequest, match=r"covers video frames \[20, 26\)"):
        A.features_from_pcm(pcm, enc, 20, [26])


@pytest.mark.parametrize("frame", [99, 140, 1000])
def test_features_from_pcm_rejects_frames_outside_the_audio(frame):
    pcm = _signal(40 * 640 / SR)
    enc = _RecordingEncoder()
    with pytest.raises(BadRequest, match=r"audio_pcm with audio_frame_offset=100 covers video "
                                         rf"frames \[100, 140\).*frame {frame} is outside") as e:
        A.features_from_pcm(pcm, enc, 100, [120, frame])
    assert e.value.details["covered"] == [100, 140]
    assert enc.calls == []  # rejected before any work


def test_features_from_pcm_rejects_bad_offset_and_bad_pcm():
    enc = _RecordingEncoder()
    with pytest.raises(BadRequest, match="audio_frame_offset must be an integer >= 0"):
        A.features_from_pcm(_signal(0.2), enc, -1, [0])
    with pytest.raises(BadRequest, match="audio_pcm.*non-finite"):
        A.features_from_pcm(np.full(640, np.nan, np.float32), enc, 0, [0])


def test_features_from_pcm_rejects_a_wrong_encoder_output():
    with pytest.raises(ValueError, match="audio encoder returned shape"):
        A.features_from_pcm(_signal(0.5), lambda x: np.zeros((x.shape[0], 256), np.float32),
                            0, [3])


# --------------------------------------------------------------------------- resample


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[np.argmax(spec)])


def test_resample_stereo_441k_tone_keeps_pitch_and_duration():
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, 0.9 * left], axis=1)
    wav = (stereo * 32767).astype(np.int16)  # what a WAV reader returns
    out = A.resample(wav, rate)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - t.size * 16000 / rate) <= 1
    assert abs(_peak_hz(out, 16000) - 1000) <= 16000 / out.size  # within one FFT bin
    # Channels averaged: amplitude (0.5 + 0.45)/2 survives the polyphase filter.
    np.testing.assert_allclose(np.abs(out[2000:-2000]).max(), 0.475, atol=5e-3)


def test_resample_8k_mono_float_upsamples():
    t = np.arange(8000) / 8000
    out = A.resample((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    assert out.size == 16000
    assert abs(_peak_hz(out, 16000) - 440) <= 1.0


def test_resample_at_16k_only_converts():
    x = np.array([[0, 16384], [-32768, 0]], dtype=np.int16)
    np.testing.assert_array_equal(A.resample(x, 16000), np.array([0.25, -0.5], np.float32))


def test_resample_rejects_bad_input():
    with pytest.raises(BadRequest, match="sample_rate"):
        A.resample(np.zeros(10, np.float32), 0)
    with pytest.raises(BadRequest, match="audio_pcm.*non-finite"):
        A.resample(np.array([0.0, np.nan]), 44100)
    with pytest.raises(BadRequest, match=r"audio_pcm float samples must lie in \[-1, 1\]"):
        A.resample(np.array([0.0, 2.0]), 44100)


def test_mel_columns_alone_equal_the_whole_mel_and_the_bands_equal_the_matrix():
    """A request computes only the mel columns its windows read; each column is its own 800
    samples, so they are the whole mel's, bit for bit. The banded filterbank is the matrix."""
    x = np.random.default_rng(5).uniform(-0.5, 0.5, 16000).astype(np.float64)
    whole = A._mel_from_float(x)
    assert whole.shape[1] == A.mel_columns(x.size) == 81
    for first, last in ((0, 16), (30, 46), (65, 81), (0, 81)):
        np.testing.assert_array_equal(A._mel_from_float(x, first, last), whole[:, first:last])
    bins, weights, starts = A._mel_bands()
    mag = np.abs(np.random.default_rng(6).standard_normal((7, 1 + A.N_FFT // 2)))
    banded = np.add.reduceat(mag[:, bins] * weights, starts, axis=1).T
    np.testing.assert_allclose(banded, A.mel_filterbank() @ mag.T, rtol=1e-12, atol=0)
