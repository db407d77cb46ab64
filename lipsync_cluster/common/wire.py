"""The frames on the wire: lean multipart I/O, the bounded header decode, socket settings.

pyzmq's ``send_multipart`` / ``recv_multipart`` spend most of their time in Python-level sugar
(enum flag arithmetic per frame, a ``getsockopt(RCVMORE)`` call per frame). Calling the Cython
base methods directly and reading ``Frame.more`` does the same work at about a third of the cost
per message, which is most of the broker's per-request budget. Semantics are unchanged: every
frame is a zmq Frame received without copying; Frames are re-sent by reference (no copy).

:func:`read_header` (:func:`decode_header` for one header frame) is the one header decode of the
broker and the worker loop: the header frame is size-checked *before* it is unpacked (a 190 MB
msgpack array of ``nil`` would otherwise hold the broker's loop for seconds and its memory for
gigabytes), unpacked once with msgpack's length limits, and must be a map. :func:`batch_frames`
and :func:`unbatch` carry several worker legs (or replies) in one message. The socket
constants are the ones every peer connection uses.
"""
from __future__ import annotations

from typing import Any

import msgpack
import zmq

from .errors import BadRequest

TAG = b"LSC1"

# A client request's header: ids, a few numbers and the tensor descriptors; never data.
MAX_HEADER_BYTES = 64 * 2**10
# A worker leg: the client's header plus the fields the broker adds (rid, deadline, hint, ...).
MAX_LEG_HEADER_BYTES = MAX_HEADER_BYTES + 4 * 2**10
# A worker's own report (stats list every loaded model with its numbers; events, heartbeats).
MAX_WORKER_HEADER_BYTES = 256 * 2**10

HWM = 100_000               # messages queued per peer connection (a peer that stops reading loses replies)
SOCKET_BUFFER = 4 * 2**20   # kernel send/receive buffer per connection: a 1 MB payload crosses
                            # loopback in fewer flow-control rounds (the kernel caps the value)

_Base = zmq.backend.Socket
_send = _Base.send
_recv = _Base.recv
_get = _Base.get
_unpackb = msgpack.unpackb
_Frame = zmq.Frame

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def recv_parts(sock: zmq.Socket) -> list:
    """All frames of the next message as zmq Frames; raises ``zmq.Again`` when there is none."""
    frame = _recv(sock, NOBLOCK, False)
    parts = [frame]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        parts.append(frame)
    return parts


def send_parts(sock: zmq.Socket, parts: list, flags: int = NOBLOCK) -> None:
    """Send ``parts`` as one message. Frames go by reference; large buffers are not copied."""
    last = len(parts) - 1
    more = flags | SNDMORE
    for i in range(last):
        _send(sock, parts[i], more, False)
    _send(sock, parts[last], flags, False)


def frame_buffer(frame: Any) -> Any:
    """The bytes of a zmq Frame (its buffer, not a copy); bytes and memoryviews as they are."""
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else frame


def readable(sock: zmq.Socket) -> bool:
    """A message is waiting (cheap: one getsockopt, no poll syscall)."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def tune(sock: zmq.Socket) -> None:
    """The queue and kernel buffer sizes of a peer connection (broker ROUTERs, worker DEALER)."""
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)


def read_header(frames: list, at: int = 0, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The header of the message ``frames[at:]`` = ``[TAG, header, payloads...]``.

    Checks, cheapest first: the frame count, the tag, then :func:`decode_header`. Raises
    :class:`BadRequest` saying which. ``max_bytes=0`` means no size limit (a client reading the
    broker's answers).
    """
    if len(frames) < at + 2:
        raise BadRequest(f"message has {len(frames) - at} frame(s); expected at least 2 (tag, header)")
    tag = frames[at]
    tag = tag.bytes if type(tag) is _Frame else bytes(tag)
    if tag != TAG:
        raise BadRequest(f"frame 0 (protocol tag) is {tag[:16]!r}; expected {TAG!r}")
    return decode_header(frames[at + 1], max_bytes)


def decode_header(frame: Any, max_bytes: int = MAX_HEADER_BYTES, what: str = "frame 1 (header)") -> dict:
    """One header frame: its size checked before it is unpacked, one unpack with msgpack's
    length limits, and a map. Raises :class:`BadRequest` naming ``what``."""
    buf = frame.buffer if type(frame) is _Frame else frame
    size = buf.nbytes if type(buf) is memoryview else len(buf) if type(buf) is bytes else memoryview(buf).nbytes
    if max_bytes and size > max_bytes:
        raise BadRequest(f"{what} is {size} bytes; the limit is {max_bytes} bytes", size=size, limit=max_bytes)
    limit = size  # nothing in a header can be longer than the header itself
    try:
        header = _unpackb(buf, max_str_len=limit, max_bin_len=limit, max_array_len=limit,
                          max_map_len=limit // 2, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types; all mean the same to a caller
        raise BadRequest(f"{what} is not valid msgpack: {exc}") from None
    if type(header) is not dict:
        raise BadRequest(f"{what} must be a msgpack map, got {type(header).__name__}")
    return header


# --- batches on the worker leg ----------------------------------------------------------------
#
# Between the broker and a worker that announced ``batches`` in its ``ready``, several legs (or
# replies) may travel as one message: ``[TAG, {"op": "requests"|"replies", "frames": [n1, n2, ...]},
# item1 frames..., item2 frames...]`` where item i is its ``n_i`` frames: its own header frame
# (exactly as it would travel alone, size-checked on its own) and its payload frames. One message
# instead of one per request saves ZeroMQ's per-message work (the identity and tag frames, the
# pipe wake-ups, the I/O thread's reads and writes) on both ends; each item is handled as if it
# had come alone.

MAX_BATCH_ITEMS = 64  # legs or replies in one message


def batch_frames(op: str, items: list, packer: msgpack.Packer) -> list:
    """The frames of one ``op`` batch message carrying ``items`` (each ``[header, *payloads]``)."""
    frames = [TAG, packer.pack({"op": op, "frames": [len(item) for item in items]})]
    for item in items:
        frames.extend(item)
    return frames


def split_batch(header: dict, frames: list, at: int) -> list[list]:
    """``frames[at:]`` cut into the items of a batch message whose header is ``header``.

    Raises :class:`BadRequest` unless ``header["frames"]`` is a list of 1..MAX_BATCH_ITEMS counts,
    each at least 1 (the item's header), that add up to the frames there are."""
    counts = header.get("frames")
    if type(counts) is not list or not 0 < len(counts) <= MAX_BATCH_ITEMS:
        raise BadRequest(f"a {header.get('op')!r} batch needs 'frames': a list of 1 to {MAX_BATCH_ITEMS} counts")
    items, i, end = [], at, len(frames)
    for n in counts:
        if type(n) is not int or n < 1 or i + n > end:
            raise BadRequest(f"a {header.get('op')!r} batch's 'frames' counts {counts[:8]!r} do not match "
                             f"its {end - at} frame(s)")
        items.append(frames[i:i + n])
        i += n
    if i != end:
        raise BadRequest(f"a {header.get('op')!r} batch has {end - i} frame(s) beyond its 'frames' counts")
    return items


def unbatch(header: dict, frames: list, at: int, item_op: str, max_bytes: int) -> tuple[list, list[str]]:
    """The items of a batch message (its header ``header``, its items in ``frames[at:]``): the
    ``(header, payloads)`` of each well-formed ``item_op`` item, and why each other one is
    skipped (the rest are still served). Raises :class:`BadRequest` when the counts are wrong."""
    items, skipped = [], []
    for i, item in enumerate(split_batch(header, frames, at)):
        try:
            h = decode_header(item[0], max_bytes, f"item {i}'s header")
        except BadRequest as exc:
            skipped.append(exc.message)
            continue
        if h.get("op") == item_op:
            items.append((h, item[1:]))
        else:
            skipped.append(f"item {i} is op {str(h.get('op'))[:32]!r}, not {item_op!r}")
    return items, skipped

