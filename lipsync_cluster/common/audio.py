"""Audio front end of the SyncTalk_2D family: PCM -> mel -> encoder inputs -> UNet windows.

The contract (every number here must match the models' training code exactly):

* Audio is 16 kHz mono. :func:`to_float_pcm` is the single gate for client PCM: int16 is
  scaled by 1/32768, float32/float64 must be finite, 1-D (``[N,1]``/``[1,N]`` are squeezed)
  and inside [-1, 1]; anything else is a :class:`~lipsync_cluster.common.errors.BadRequest`
  naming the field.
* :func:`melspectrogram` is the Wav2Lip / SyncTalk_2D front end: pre-emphasis 0.97, centred
  STFT (n_fft 800, hop 200, periodic Hann 800, **reflect** padding of 400 samples on each
  side - the librosa < 0.10 default the models were trained with; librosa >= 0.10 defaults to
  zero padding, which changes the first and last columns), magnitude, Slaney mel filterbank
  (80 bins, 55-7600 Hz), ``dB = 20*log10(max(1e-5, mel)) - 20`` and
  ``clip(8*(dB+100)/100 - 4, -4, 4)``. The result is ``[80, T]`` with ``T = 1 + len//200``:
  80 mel columns per second, 3.2 per video frame.
* Video frame ``p`` (25 fps, counted from the mel's start) feeds the audio encoder the 16 mel
  columns starting at ``int(80*p/25)`` (:func:`encoder_inputs`, ``[N,1,80,16]``); the encoder
  returns ``[N,512]``.
* The UNet's audio input for frame ``p`` is the encoder rows ``p-8 .. p+7`` clamped to the
  clip (edges repeat the first/last row), ``16x512`` reshaped C-order to ``(32,16,16)``
  (:func:`unet_windows`). Every frame of a batch gets its own window.
* Streaming: a batch of frames ``[s, s+B)`` needs the audio of frames
  ``[s-8, s+B+8)`` (:func:`pcm_span_for_batch`); the client sends that slice of PCM with
  ``audio_frame_offset = s-8`` (clamped at 0), and the worker turns it into windows with
  :func:`features_from_pcm`. One video frame is :data:`SAMPLES_PER_FRAME` = 640 samples.
  Mel columns are indexed on the stream's absolute grid (column c centred on sample 200*c
  of the whole stream, frame a starting at column int(80*a/25)), whatever the offset, so a
  span gives the same windows as the whole clip wherever it has enough audio around them.

Runtime dependencies: numpy only (scipy, lazily, for :func:`resample`). librosa is used by the
tests as an independent reference and must never be imported from here.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from .errors import BadRequest
from .extras import MissingExtra

SAMPLE_RATE = 16000
FPS = 25
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55
FMAX = 7600
PREEMPHASIS = 0.97
MEL_STEP = 16  # mel columns per audio-encoder window
CONTEXT_BEFORE = 8  # UNet window for frame i = encoder outputs of frames i-8 .. i+7
CONTEXT_AFTER = 7
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
ENCODER_DIM = 512
UNET_AUDIO_SHAPE = (32, 16, 16)  # 16 x 512 = 8192 = 32 x 16 x 16

_MIN_LEVEL_DB = -100.0
_REF_LEVEL_DB = 20.0
_MAX_ABS_VALUE = 4.0
_AMP_FLOOR = 1e-5
# Float samples may overshoot 1.0 by float rounding in other pipelines (e.g. x/32767 vs
# x/32768); such values are harmless and clipped. Anything larger means the client sent
# unnormalised audio (e.g. int16 values as floats), which would silently produce garbage.
_RANGE_TOLERANCE = 1e-4
# Frames per STFT block: bounds the temporary [block, 800] float64 buffers to ~13 MB no
# matter how long the clip is.
_STFT_BLOCK = 2048


# --------------------------------------------------------------------------- PCM input


def to_float_pcm(pcm: np.ndarray, field: str = "audio_pcm") -> np.ndarray:
    """Validate client PCM and return it as contiguous float32 1-D samples in [-1, 1].

    int16 is divided by 32768. float32/float64 must be finite and within [-1, 1] (up to a
    1e-4 rounding tolerance, clipped). ``[N,1]`` and ``[1,N]`` are squeezed. Raises
    :class:`BadRequest` naming ``field`` for anything else, including empty input.
    """
    x = np.asarray(pcm)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise BadRequest(
            f"{field} must be 1-D mono samples (or [N,1]/[1,N]); got shape {list(x.shape)}",
            field=field)
    if x.size == 0:
        raise BadRequest(f"{field} is empty; at least 1 sample is required", field=field)
    if x.dtype == np.int16:
        return np.ascontiguousarray(x, dtype=np.float32) * np.float32(1.0 / 32768.0)
    if x.dtype not in (np.float32, np.float64):
        raise BadRequest(
            f"{field} must be int16, float32 or float64; got dtype {x.dtype}", field=field)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise BadRequest(f"{field} contains {bad} non-finite sample(s) (NaN or inf)",
                         field=field)
    peak = float(np.max(np.abs(x)))
    if peak > 1.0 + _RANGE_TOLERANCE:
        raise BadRequest(
            f"{field} float samples must lie in [-1, 1]; max |x| was {peak:.6g}", field=field)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if peak > 1.0:
        x = np.clip(x, -1.0, 1.0)
    return x


def resample(pcm: np.ndarray, rate: int, field: str = "audio_pcm") -> np.ndarray:
    """Turn WAV-style samples of any rate and channel count into float32 mono 16 kHz.

    ``pcm`` is ``[N]`` or ``[N, C]`` (channels last, as ``soundfile``/``scipy.io.wavfile``
    return them); channels are averaged. Integer PCM is scaled to [-1, 1] (int16 / 32768,
    int32 / 2**31, uint8 centred on 128); float PCM must be finite and within [-1, 1].
    Resampling is polyphase (``scipy.signal.resample_poly`` with the gcd-reduced up/down
    factors, Kaiser-windowed FIR), so tones keep their pitch and the length scales by
    ``16000/rate`` (rounded up). The result is clipped to [-1, 1]: the anti-aliasing filter
    can ring slightly past full scale, and :func:`to_float_pcm` would reject that.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise BadRequest(f"sample_rate must be a positive integer; got {rate!r}",
                         field="sample_rate")
    rate = int(rate)
    x = np.asarray(pcm)
    if x.ndim not in (1, 2):
        raise BadRequest(f"{field} must be [N] or [N, channels]; got shape {list(x.shape)}",
                         field=field)
    if x.shape[0] == 0 or x.size == 0:
        raise BadRequest(f"{field} is empty; at least 1 sample is required", field=field)
    if x.dtype == np.int16:
        y = x.astype(np.float64) / 32768.0
    elif x.dtype == np.int32:
        y = x.astype(np.float64) / 2147483648.0
    elif x.dtype == np.uint8:
        y = (x.astype(np.float64) - 128.0) / 128.0
    elif x.dtype in (np.float32, np.float64):
        y = x.astype(np.float64)
        if not np.isfinite(y).all():
            raise BadRequest(f"{field} contains non-finite samples (NaN or inf)", field=field)
        peak = float(np.max(np.abs(y)))
        if peak > 1.0 + _RANGE_TOLERANCE:
            raise BadRequest(
                f"{field} float samples must lie in [-1, 1]; max |x| was {peak:.6g}",
                field=field)
    else:
        raise BadRequest(
            f"{field} must be int16, int32, uint8, float32 or float64; got dtype {x.dtype}",
            field=field)
    if y.ndim == 2:
        y = y.mean(axis=1)
    if rate != SAMPLE_RATE:
        # Imported here so that workers (which never resample) do not pay scipy's import, and a
        # plain install (no scipy) streams 16 kHz audio.
        try:
            from scipy.signal import resample_poly
        except ModuleNotFoundError:
            raise MissingExtra(f"{field} at {rate} Hz (resampling to {SAMPLE_RATE} Hz)", "tools", "scipy") from None

        g = math.gcd(SAMPLE_RATE, rate)
        y = resample_poly(y, SAMPLE_RATE // g, rate // g)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- mel


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale (librosa htk=False): linear below 1 kHz, log above.
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz,
                    min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    hz / f_sp)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel,
                    min_log_hz * np.exp(logstep * (mel - min_log_mel)),
                    f_sp * mel)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Slaney mel filterbank ``[n_mels, 1 + n_fft//2]`` float64 (= librosa.filters.mel defaults).

    Triangles between consecutive points of an even mel grid, each scaled by
    ``2 / (f[i+2] - f[i])`` so every filter has unit area (``norm='slaney'``). Cached and
    returned read-only: callers share one array.
    """
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_pts = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    # Periodic Hann (scipy get_window('hann', N, fftbins=True), librosa's STFT window): the
    # DFT-even form, 0.5 - 0.5*cos(2*pi*n/N) for n < N, not the symmetric N-1 form.
    n = np.arange(WIN, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=1)
def _mel_bands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The filterbank as bands: FFT bins, their weights, and where each filter's bins begin.

    Each Slaney filter is non-zero over a few neighbouring bins (about 800 of the 80 x 401
    weights), so ``basis @ mag`` done band by band is ~40 times less arithmetic, and it stays off
    BLAS, whose thread pool busy-waits for a matrix this small (several ms of CPU per request on
    2 cores). Sums are float64, as the matrix product's are."""
    basis = mel_filterbank()
    bins: list[int] = []
    weights: list[float] = []
    starts: list[int] = []
    for m in range(basis.shape[0]):
        nz = np.flatnonzero(basis[m])
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)  # an empty filter: one zero weight
        starts.append(len(bins))
        bins.extend(range(lo, hi))
        weights.extend(basis[m, lo:hi])
    arrays = (np.asarray(bins, np.intp), np.asarray(weights, np.float64), np.asarray(starts, np.intp))
    for a in arrays:
        a.setflags(write=False)
    return arrays


def mel_columns(n_samples: int) -> int:
    """Columns of :func:`melspectrogram` for ``n_samples`` samples: ``1 + n_samples // 200``."""
    return 1 + int(n_samples) // HOP


def _mel_from_float(x: np.ndarray, first: int = 0, last: int | None = None) -> np.ndarray:
    """Mel of already-validated float samples (see :func:`melspectrogram`), columns
    ``[first, last)`` only (default all): each column depends only on its own 800 samples."""
    x = np.asarray(x, dtype=np.float64)
    # Pre-emphasis, lfilter([1, -0.97], [1]) semantics: y[0] = x[0].
    y = x.copy()
    y[1:] -= PREEMPHASIS * x[:-1]
    # Centred frames: reflect-pad n_fft//2 each side (librosa < 0.10 default, what the
    # SyncTalk_2D/Wav2Lip models were trained on). np.pad repeats the reflection when the
    # clip is shorter than the pad (as librosa does), so even 1-sample input yields T = 1.
    padded = np.pad(y, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][first:last]
    n_cols = frames.shape[0]
    bins, weights, starts = _mel_bands()
    window = _hann()
    out = np.empty((N_MELS, n_cols), dtype=np.float64)
    for a in range(0, n_cols, _STFT_BLOCK):
        b = min(a + _STFT_BLOCK, n_cols)
        mag = np.abs(np.fft.rfft(frames[a:b] * window, axis=1))  # [cols, 401]
        out[:, a:b] = np.add.reduceat(mag[:, bins] * weights, starts, axis=1).T
    db = 20.0 * np.log10(np.maximum(_AMP_FLOOR, out)) - _REF_LEVEL_DB
    norm = (2.0 * _MAX_ABS_VALUE) * ((db - _MIN_LEVEL_DB) / -_MIN_LEVEL_DB) - _MAX_ABS_VALUE
    return np.clip(norm, -_MAX_ABS_VALUE, _MAX_ABS_VALUE).astype(np.float32)


def melspectrogram(pcm: np.ndarray) -> np.ndarray:
    """Normalised log-mel of 16 kHz mono PCM: ``[80, 1 + len(pcm)//200]`` float32 in [-4, 4].

    ``pcm`` goes through :func:`to_float_pcm` (field ``audio_pcm``) first. Silence maps to -4.
    """
    return _mel_from_float(to_float_pcm(pcm, "audio_pcm"))


# --------------------------------------------------------------------------- windows


def _int_positions(positions: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(positions)
    if p.ndim == 0:
        p = p.reshape(1)
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D sequence of integers; got {p.dtype} {p.shape}")
    return p.astype(np.int64)


def encoder_inputs(mel: np.ndarray, frame_positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """Audio-encoder inputs ``[N,1,80,16]`` float32 for video frames ``frame_positions``.

    Position ``p`` (0-based from the mel's first column) takes the 16 columns starting at
    ``int(80*p/25)`` - computed as the exact integer ``80*p // 25``, which equals the float
    expression for every non-negative ``p``. A window that would run past the end is moved
    back to start at ``T-16`` (SyncTalk_2D's end-of-clip behaviour), and a mel shorter than
    16 columns is first padded on the right by repeating its last column.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[0] != N_MELS or mel.shape[1] < 1:
        raise ValueError(f"mel must be [{N_MELS}, T>=1]; got {list(mel.shape)}")
    p = _int_positions(frame_positions, "frame_positions")
    if p.size and p.min() < 0:
        raise ValueError(f"frame_positions must be >= 0; got {int(p.min())}")
    return _windows_at_columns(mel, (80 * p) // FPS)


def _windows_at_columns(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``[N,1,80,16]`` windows of ``mel`` starting at columns ``starts`` (clamped to the clip)."""
    n_cols = mel.shape[1]
    if n_cols < MEL_STEP:
        mel = np.concatenate([mel, np.repeat(mel[:, -1:], MEL_STEP - n_cols, axis=1)], axis=1)
        n_cols = MEL_STEP
    starts = np.clip(starts, 0, n_cols - MEL_STEP)
    cols = starts[:, None] + np.arange(MEL_STEP)  # [N, 16]
    # mel[:, cols] is [80, N, 16]; move N to the front and add the channel axis.
    out = np.ascontiguousarray(mel[:, cols].transpose(1, 0, 2))
    return out[:, None, :, :]


def _window_rows(positions: np.ndarray, n: int) -> np.ndarray:
    """Encoder row indices ``[B,16]`` of each position's UNet window, clamped to [0, n-1]."""
    offsets = np.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    return np.clip(positions[:, None] + offsets[None, :], 0, n - 1)


def unet_windows(encoded: np.ndarray, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """UNet audio inputs ``[B,32,16,16]`` float32 from per-frame encoder outputs ``[N,512]``.

    Position ``p`` gets rows ``p-8 .. p+7`` of ``encoded``, each clamped to ``[0, N-1]`` (so
    the clip's first/last row repeats at the edges), as a ``16x512`` block reshaped C-order to
    ``(32,16,16)``. Positions outside ``[0, N)`` are allowed and simply clamp.
    """
    enc = np.asarray(encoded, dtype=np.float32)
    if enc.ndim != 2 or enc.shape[1] != ENCODER_DIM or enc.shape[0] < 1:
        raise ValueError(f"encoded must be [N>=1, {ENCODER_DIM}]; got {list(enc.shape)}")
    p = _int_positions(positions, "positions")
    rows = _window_rows(p, enc.shape[0])
    return np.ascontiguousarray(enc[rows].reshape(p.size, *UNET_AUDIO_SHAPE))


# --------------------------------------------------------------------------- streaming


def frames_covered(num_samples: int) -> int:
    """Video frames an audio span of ``num_samples`` touches: ``ceil(num_samples / 640)``."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0; got {num_samples}")
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


# Frames of audio a batch needs beyond itself (see pcm_span_for_batch).
SPAN_BEFORE = CONTEXT_BEFORE + 1
SPAN_AFTER = 12


def pcm_span_for_batch(start_frame: int, batch_size: int,
                       total_frames: int | None = None) -> tuple[int, int]:
    """Video-frame range ``[first, end)`` whose audio a batch ``[start, start+B)`` needs.

    That is the UNet context either side (8 frames before, 7 after) plus what the audio
    encoder and the centred STFT reach beyond it (16 mel columns, about 4.6 frames, past the
    last frame, and 400 samples before the first): ``[start-9, start+B+12)``, clamped to
    ``>= 0`` and, when ``total_frames`` (the stream's audio length in frames) is known, to
    ``<= total_frames``. With this span a batch's windows are bit-identical to those of the
    whole clip. The client sends PCM samples ``[first*640, end*640)`` with
    ``audio_frame_offset = first``.
    """
    if start_frame < 0:
        raise BadRequest(f"start_frame_idx must be >= 0; got {start_frame}",
                         field="start_frame_idx")
    if batch_size < 1:
        raise BadRequest(f"batch_size must be >= 1; got {batch_size}", field="batch_size")
    first = max(0, start_frame - SPAN_BEFORE)
    end = start_frame + batch_size + SPAN_AFTER
    if total_frames is not None:
        if start_frame >= total_frames:
            raise BadRequest(
                f"start_frame_idx ({start_frame}) is past the audio's end "
                f"({total_frames} frames)", field="start_frame_idx")
        end = min(end, total_frames)
    return first, end


def features_from_pcm(pcm: np.ndarray,
                      encode: Callable[[np.ndarray], np.ndarray],
                      audio_frame_offset: int,
                      frame_indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """UNet audio windows ``[B,32,16,16]`` for absolute video frames ``frame_indices``.

    ``pcm`` (validated by :func:`to_float_pcm`) covers video frames
    ``[audio_frame_offset, audio_frame_offset + n)`` with ``n = frames_covered(len(pcm))``;
    every requested frame must lie in that range. ``encode`` maps ``[K,1,80,16]`` float32 to
    ``[K,512]`` (the audio-encoder ONNX session in production). The mel is computed once for
    the whole span, and ``encode`` is called exactly once, on only the positions that some
    requested window uses (sorted, each once). Windows clamp at the edges of the span, as
    :func:`unet_windows` does. Mel columns are chosen on the absolute grid (absolute frame
    ``a`` starts at column ``int(80*a/25)`` of the whole stream), not relative to the span.
    """
    x = to_float_pcm(pcm, "audio_pcm")
    if (isinstance(audio_frame_offset, bool)
            or not isinstance(audio_frame_offset, (int, np.integer))
            or audio_frame_offset < 0):
        raise BadRequest(
            f"audio_frame_offset must be an integer >= 0; got {audio_frame_offset!r}",
            field="audio_frame_offset")
    offset = int(audio_frame_offset)
    n = frames_covered(x.size)
    try:
        idx = _int_positions(frame_indices, "frame_indices")
    except ValueError as exc:
        raise BadRequest(str(exc), field="frame_indices") from None
    if idx.size == 0:
        return np.empty((0, *UNET_AUDIO_SHAPE), dtype=np.float32)
    rel = idx - offset
    outside = (rel < 0) | (rel >= n)
    if outside.any():
        bad = int(idx[np.argmax(outside)])
        raise BadRequest(
            f"audio_pcm with audio_frame_offset={offset} covers video frames "
            f"[{offset}, {offset + n}) ({x.size} samples, {SAMPLES_PER_FRAME} per frame); "
            f"frame {bad} is outside it",
            field="audio_pcm", covered=[offset, offset + n], frame=bad)
    rows = _window_rows(rel, n)  # [B,16] positions relative to the span
    needed = np.unique(rows)  # sorted, so searchsorted maps rows back to encoder outputs
    # Mel columns live on an absolute grid: column c is centred on sample 200*c of the whole
    # stream, and absolute frame a starts at column int(80*a/25). The span starts at sample
    # 640*offset, which is on that grid only when offset is a multiple of 5; otherwise a mel
    # of the raw span would be shifted by 40..160 samples and every window would differ from
    # the whole-clip result (by a different shift for every batch). So drop the few samples
    # before the first grid point and index columns absolutely.
    base = offset * SAMPLES_PER_FRAME
    skip = (-base) % HOP  # 0, 40, 80, 120 or 160
    if skip >= x.size:  # a span shorter than the skip: nothing on the grid; keep it whole
        skip = 0
    first_col = -(-base // HOP)  # absolute column of the trimmed span's column 0
    starts = (80 * (needed + offset)) // FPS - first_col
    n_cols = mel_columns(x.size - skip)
    if n_cols >= MEL_STEP:
        # Only the columns some window reads (a client may send far more audio than the batch
        # uses): the clamp is _windows_at_columns', done here on the whole clip's column count.
        starts = np.clip(starts, 0, n_cols - MEL_STEP)
        c0 = int(starts.min())
        windows = _windows_at_columns(_mel_from_float(x[skip:], c0, int(starts.max()) + MEL_STEP), starts - c0)
    else:
        windows = _windows_at_columns(_mel_from_float(x[skip:]), starts)
    feats = encode(windows)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.shape != (needed.size, ENCODER_DIM):
        raise ValueError(
            f"audio encoder returned shape {list(feats.shape)} for {needed.size} inputs; "
            f"expected [{needed.size}, {ENCODER_DIM}]")
    gathered = feats[np.searchsorted(needed, rows)]  # [B,16,512]
    return np.ascontiguousarray(gathered.reshape(idx.size, *UNET_AUDIO_SHAPE))
