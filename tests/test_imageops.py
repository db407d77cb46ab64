"""imageops against a plain transcription of SyncTalk_2D's inference code (the reference)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_cluster.common import imageops
from lipsync_cluster.common.errors import BadRequest

RNG = np.random.default_rng(7)


def _frame(h: int = 240, w: int = 320) -> np.ndarray:
    # Smooth content plus noise, so that resizes and encoders see something image-like.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], axis=-1)
    noise = RNG.integers(0, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# --- the reference: SyncTalk_2D inference_328.py, written out line by line ------------------

def ref_inputs(frame: np.ndarray, rect) -> tuple[np.ndarray, np.ndarray]:
    xmin, ymin, xmax, ymax = rect
    crop_img = frame[ymin:ymax, xmin:xmax]
    crop_img = cv2.resize(crop_img, (328, 328), interpolation=cv2.INTER_CUBIC)
    img_real_ex = crop_img[4:324, 4:324].copy()
    img_real_ex_ori = img_real_ex.copy()
    img_masked = cv2.rectangle(img_real_ex_ori, (5, 5, 310, 305), (0, 0, 0), -1)
    img_masked = img_masked.transpose(2, 0, 1).astype(np.float32)
    img_real_ex = img_real_ex.transpose(2, 0, 1).astype(np.float32)
    concat = np.concatenate([img_real_ex / 255.0, img_masked / 255.0], axis=0)
    return concat.astype(np.float32), crop_img


def ref_paste(frame: np.ndarray, rect, crop_img: np.ndarray, pred: np.ndarray) -> np.ndarray:
    xmin, ymin, xmax, ymax = rect
    pred = pred.transpose(1, 2, 0) * 255
    pred = np.array(pred, dtype=np.uint8)
    crop_img_ori = crop_img.copy()
    crop_img_ori[4:324, 4:324] = pred
    crop_img_ori = cv2.resize(crop_img_ori, (xmax - xmin, ymax - ymin), interpolation=cv2.INTER_CUBIC)
    out = frame.copy()
    out[ymin:ymax, xmin:xmax] = crop_img_ori
    return out


RECTS = [(40, 30, 200, 210), (0, 0, 320, 240), (100, 50, 137, 91)]


def test_mask_rect_is_what_cv2_rectangle_draws():
    img = np.full((320, 320), 255, np.uint8)
    cv2.rectangle(img, imageops.MASK_RECT, 0, -1)
    ours = np.full((320, 320), 255, np.uint8)
    ours[imageops.MASK_SLICE] = 0
    assert np.array_equal(img, ours)
    ys, xs = np.nonzero(ours == 0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 314, 5, 309)


@pytest.mark.parametrize("rect", RECTS)
def test_crop_and_visual_input_are_bit_identical_to_reference(rect):
    frame = _frame()
    expected, ref_crop = ref_inputs(frame, rect)
    crop = imageops.crop_face(frame, rect)
    assert crop.shape == (328, 328, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, ref_crop)
    vis = imageops.visual_input(crop)
    assert vis.shape == (6, 320, 320) and vis.dtype == np.float32
    assert np.array_equal(vis, expected)  # exact, not approximately


def test_visual_input_fills_a_preallocated_slot_and_checks_it():
    frame = _frame()
    crop = imageops.crop_face(frame, RECTS[0])
    batch = np.full((3, 6, 320, 320), -1, np.float32)
    ret = imageops.visual_input(crop, out=batch[1])
    assert np.shares_memory(ret, batch)
    assert np.array_equal(batch[1], imageops.visual_input(crop))
    assert (batch[0] == -1).all() and (batch[2] == -1).all()
    with pytest.raises(ValueError, match="out must be float32"):
        imageops.visual_input(crop, out=np.empty((6, 320, 320), np.float64))
    with pytest.raises(ValueError, match="face crop must be uint8"):
        imageops.visual_input(crop[:320, :320])


def test_build_visual_batch_matches_per_frame():
    frames = [_frame() for _ in RECTS]
    batch, crops = imageops.build_visual_batch(frames, np.array(RECTS, np.int32))
    assert batch.shape == (3, 6, 320, 320) and len(crops) == 3
    for i, (frame, rect) in enumerate(zip(frames, RECTS)):
        expected, ref_crop = ref_inputs(frame, rect)
        assert np.array_equal(batch[i], expected)
        assert np.array_equal(crops[i], ref_crop)
    with pytest.raises(ValueError, match="rects must be"):
        imageops.build_visual_batch(frames, np.array(RECTS[:2]))


def test_crop_rejects_rect_outside_frame():
    with pytest.raises(ValueError, match=r"rect \[300, 10, 400, 100\] .* outside the 320x240 frame"):
        imageops.crop_face(_frame(), (300, 10, 400, 100))
    with pytest.raises(ValueError, match="empty"):
        imageops.crop_face(_frame(), (50, 10, 50, 100))


@pytest.mark.parametrize("rect", RECTS)
def test_paste_back_matches_reference_and_leaves_outside_untouched(rect):
    frame = _frame()
    before = frame.copy()
    crop = imageops.crop_face(frame, rect)
    pred = RNG.random((3, 320, 320), dtype=np.float32)
    out = imageops.paste_back(frame, rect, crop, pred)
    assert np.array_equal(frame, before), "the background must not be written"
    assert np.array_equal(out, ref_paste(frame, rect, crop, pred))
    x1, y1, x2, y2 = rect
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], frame[outside])
    patch = imageops.paste_patch(rect, crop, pred)
    assert patch.shape == (y2 - y1, x2 - x1, 3)
    assert np.array_equal(patch, out[y1:y2, x1:x2])


@pytest.mark.parametrize("rect", RECTS)
def test_paste_back_into_a_reused_buffer_is_the_same_frame(rect):
    """dst (e.g. the thread's frame scratch) is overwritten completely: nothing of the frame that
    was composited in it before survives, and the result is the new-array result."""
    frame, other = _frame(), _frame()
    crop, pred = imageops.crop_face(frame, rect), RNG.random((3, 320, 320), dtype=np.float32)
    dst = imageops.frame_scratch(frame.shape)
    imageops.paste_back(other, (0, 0, 320, 240), imageops.crop_face(other, (0, 0, 320, 240)),
                        RNG.random((3, 320, 320), dtype=np.float32), dst=dst)
    got = imageops.paste_back(frame, rect, crop, pred, dst=dst)
    assert got is dst
    assert np.array_equal(got, ref_paste(frame, rect, crop, pred))
    assert imageops.frame_scratch(frame.shape) is dst, "the scratch is reused by the same thread"
    # the patch written into a strided region of a frame equals the patch on its own
    x1, y1, x2, y2 = rect
    region = np.zeros_like(frame)
    imageops.paste_patch(rect, crop, pred, dst=region[y1:y2, x1:x2])
    assert np.array_equal(region[y1:y2, x1:x2], imageops.paste_patch(rect, crop, pred))


def test_paste_back_refuses_a_dst_that_cannot_hold_the_frame():
    frame = _frame()
    crop, pred = imageops.crop_face(frame, RECTS[0]), RNG.random((3, 320, 320), dtype=np.float32)
    with pytest.raises(ValueError, match="dst must be a separate uint8"):
        imageops.paste_back(frame, RECTS[0], crop, pred, dst=np.empty((240, 321, 3), np.uint8))
    with pytest.raises(ValueError, match="dst must be a separate"):
        imageops.paste_back(frame, RECTS[0], crop, pred, dst=frame)  # would write the background
    with pytest.raises(ValueError, match="dst must be uint8"):
        imageops.paste_patch(RECTS[0], crop, pred, dst=np.empty((10, 10, 3), np.uint8))


def test_scratch_is_per_thread():
    import threading

    mine = imageops.frame_scratch((8, 8, 3))
    seen = []
    t = threading.Thread(target=lambda: seen.append(imageops.frame_scratch((8, 8, 3))))
    t.start()
    t.join()
    assert seen[0] is not mine and not np.shares_memory(seen[0], mine)


@pytest.mark.parametrize("shape, rect", [
    ((240, 320, 3), (40, 30, 200, 210)),     # inside, unaligned
    ((240, 320, 3), (0, 0, 320, 240)),       # the whole frame: no row outside
    ((250, 330, 3), (100, 200, 180, 250)),   # reaches a bottom edge that is not a multiple of 16
    ((250, 330, 3), (10, 0, 60, 16)),        # the first MCU row only
])
@pytest.mark.parametrize("quality", [85, 30])
def test_jpeg_of_the_face_strip_joined_to_the_background_rows_is_the_whole_frame(shape, rect, quality):
    """A background's rows outside the face strip, taken from one frame's JPEG, plus a later
    frame's strip encoded alone, are byte for byte that later frame encoded whole; and that
    JPEG decodes to exactly the pixels of the plain JPEG (restart markers change no value)."""
    frame = _frame(*shape[:2])
    crop = imageops.crop_face(frame, rect)
    first, later = (RNG.random((3, 320, 320), dtype=np.float32) for _ in range(2))
    rows = imageops.mcu_rows(rect, shape[0])
    outside = imageops.jpeg_outside_rows(imageops.encode_jpeg_rows(imageops.paste_back(frame, rect, crop, first), quality),
                                         rows, shape[0])
    assert outside is not None
    whole_frame = imageops.paste_back(frame, rect, crop, later)
    strip = imageops.paste_strip(frame, rect, crop, later, rows)
    assert np.array_equal(strip, whole_frame[rows[0] * 16:rows[1] * 16])
    joined = imageops.jpeg_join_rows(outside, rows, imageops.encode_jpeg_rows(strip, quality))
    whole = imageops.encode_jpeg_rows(whole_frame, quality)
    assert joined == whole
    plain = imageops.encode_image(whole_frame, "jpeg", quality)
    assert np.array_equal(cv2.imdecode(np.frombuffer(whole, np.uint8), cv2.IMREAD_COLOR),
                          cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR))


def test_jpeg_rows_refuse_what_is_not_laid_out_by_rows():
    frame = _frame()
    plain = imageops.encode_image(frame, "jpeg", 85)  # no restart markers: one segment
    assert imageops.jpeg_outside_rows(plain, (2, 5), 240) is None
    outside = imageops.jpeg_outside_rows(imageops.encode_jpeg_rows(frame), (2, 5), 240)
    assert imageops.jpeg_join_rows(outside, (2, 5), imageops.encode_jpeg_rows(frame[:16])) is None  # 1 row, not 3
    assert imageops.jpeg_outside_rows(b"not a jpeg", (2, 5), 240) is None
    with pytest.raises(ValueError, match="do not cover"):
        imageops.paste_strip(frame, (40, 30, 200, 210), imageops.crop_face(frame, (40, 30, 200, 210)),
                             RNG.random((3, 320, 320), dtype=np.float32), (2, 5))


def test_paste_truncates_like_synctalk_and_saturates_overshoot():
    crop = np.zeros((328, 328, 3), np.uint8)
    pred = np.full((3, 320, 320), 0.999, np.float32)  # 254.745 -> 254 (truncated, not 255)
    pred[1] = 1.7  # outside a sigmoid's range: saturates to 255 instead of wrapping
    pred[2] = -0.2
    bg = np.zeros((328, 328, 3), np.uint8)
    out = imageops.paste_back(bg, (0, 0, 328, 328), crop, pred)  # same size: resize is identity
    assert (out[4:324, 4:324, 0] == 254).all()
    assert (out[4:324, 4:324, 1] == 255).all()
    assert (out[4:324, 4:324, 2] == 0).all()
    assert (out[:4] == 0).all() and (out[:, :4] == 0).all()


def test_encode_png_is_lossless_and_jpeg_decodes():
    img = _frame()
    png = imageops.encode_image(img, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), img)
    small = imageops.encode_image(img, "png", 9)
    assert np.array_equal(cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR), img)
    jpg = imageops.encode_image(img, "jpeg")
    assert jpg[:2] == b"\xff\xd8"
    dec = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape == img.shape
    assert np.abs(dec.astype(int) - img).mean() < 12
    assert len(imageops.encode_image(img, "jpeg", 20)) < len(imageops.encode_image(img, "jpeg", 95))


@pytest.mark.parametrize("fmt,quality,field", [
    ("gif", None, "format"), ("raw", None, "format"), ("PNG", None, "format"),
    ("png", 10, "quality"), ("png", -1, "quality"), ("jpeg", 0, "quality"),
    ("jpeg", 101, "quality"), ("jpeg", 50.0, "quality"), ("png", True, "quality"), ("jpeg", "85", "quality"),
])
def test_encode_rejects_bad_format_and_quality(fmt, quality, field):
    with pytest.raises(BadRequest, match=f"field '{field}'") as info:
        imageops.encode_image(_frame(32, 32), fmt, quality)
    assert info.value.code == "bad_request"


def test_pingpong_sequence():
    assert [imageops.pingpong_index(i, 4) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [imageops.pingpong_index(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [imageops.pingpong_index(i, 1) for i in range(3)] == [0, 0, 0]
    for n in (1, 2, 3, 7, 50):
        for start in (0, 5, 97, 1000):
            vec = imageops.pingpong_indices(start, 40, n)
            assert vec.tolist() == [imageops.pingpong_index(start + j, n) for j in range(40)]
            assert vec.min() >= 0 and vec.max() <= n - 1
    assert imageops.pingpong_indices(3, 0, 5).shape == (0,)
    with pytest.raises(ValueError, match="at least 1"):
        imageops.pingpong_index(0, 0)
