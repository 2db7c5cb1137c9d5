"""An incremental Server-Sent Events parser (the WHATWG event-stream format).

A small parser of our own rather than a library: the SSE libraries for httpx decode line by
line through Python callbacks, and a replay of a large queue delivers hundreds of thousands of
frames per second, so the per-frame cost matters (see the package README for the figures).
This one splits a received chunk into frames with one ``bytes.split`` and each frame into its
lines with another, keeps only the fields eventqueue sends (``id``, ``event``, ``data``),
honours comments, multi-line ``data``, ``CRLF`` / ``CR`` line ends and a frame split across
chunks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["Frame", "SSEParser"]


class Frame(NamedTuple):
    """One dispatched event: its type (``message`` when unnamed), data, and id if it had one."""

    event: bytes
    data: bytes
    id: Optional[bytes]


class SSEParser:
    """Feed it the body's chunks; it returns the frames completed so far."""

    __slots__ = ("_buf", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[Frame]:
        if self._skip_lf:
            # The previous chunk ended with a CR: a LF now is the second half of that CRLF.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        return _frames(blocks)

    @property
    def pending(self) -> bytes:
        """Bytes of a frame not completed yet."""
        return self._buf


def _frames(blocks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
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
        out.append(Frame(event or b"message", data, ident))
    return out
