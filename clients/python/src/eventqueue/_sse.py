"""An incremental Server-Sent Events parser (the WHATWG event-stream format).

A small parser of our own rather than a library: the SSE libraries for httpx decode line by
line through Python calls, and a replay of a large queue delivers hundreds of thousands of
frames per second, so the cost per frame decides the replay rate (see the package README).
A received run of complete frames that are all of the shape eventqueue sends for events
(``id``, ``event``, ``data``) is taken apart by two regex passes in C; anything else (the
``connected`` and ``gap`` frames, comments, multi-line ``data``, ``CRLF`` / ``CR`` line ends,
other fields) goes through a general parser. A frame split across chunks waits for its end.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

__all__ = ["Frame", "RawFrame", "SSEParser"]

#: A frame as ``feed`` returns it: ``(id, event, data)`` (a plain tuple: cheaper to make).
RawFrame = tuple[Optional[bytes], bytes, bytes]

# What eventqueue sends for its events, frame after frame. A run of received frames that is
# all of this shape (a replay, a burst) is taken apart by the regex engine in two passes,
# without a Python step per frame; anything else goes through the general parser.
_EVENT_FRAME = rb"id: ([0-9]+)\nevent: ([^\n:]+)\ndata: ([^\n]*)\n\n"
_ALL_EVENT_FRAMES = re.compile(rb"(?:id: [0-9]+\nevent: [^\n:]+\ndata: [^\n]*\n\n)*")
_EVENT_FRAMES = re.compile(_EVENT_FRAME)


class Frame(NamedTuple):
    """One dispatched event: its id if it had one, its type (``message`` when unnamed) and
    data. Equal to the ``RawFrame`` tuple the parser returns."""

    id: Optional[bytes]
    event: bytes
    data: bytes


class SSEParser:
    """Feed it the body's chunks; it returns the frames completed so far."""

    __slots__ = ("_buf", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[RawFrame]:
        if self._skip_lf:
            # The previous chunk ended with a CR: a LF now is the second half of that CRLF.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return []
        complete, self._buf = buf[: cut + 2], buf[cut + 2 :]
        if _ALL_EVENT_FRAMES.fullmatch(complete):
            frames: list[RawFrame] = _EVENT_FRAMES.findall(complete)
            return frames
        return _frames(complete.split(b"\n\n"))

    @property
    def pending(self) -> bytes:
        """Bytes of a frame not completed yet."""
        return self._buf


def _frames(blocks: list[bytes]) -> list[RawFrame]:
    out: list[RawFrame] = []
    for block in blocks:
        if not block:
            continue
        event = b""
        data: Optional[bytes] = None
        more: Optional[list[bytes]] = None
        ident: Optional[bytes] = None
        for line in block.split(b"\n"):
            if not line or line[0] == 58:  # empty, or ":" (a comment)
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                if data is None:
                    data = value
                elif more is None:
                    more = [data, value]
                else:
                    more.append(value)
            elif field == b"event":
                event = value
            elif field == b"id" and b"\0" not in value:
                ident = value
        if data is None:
            continue
        if more is not None:
            data = b"\n".join(more)
        out.append((ident, event or b"message", data))
    return out
