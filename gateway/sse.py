"""Server-Sent Events: reading the `data` of each event from a byte stream, writing one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The data of each event, as chunks arrive; comments, ids and priming events are skipped."""
    buffer = b""
    data: list[bytes] = []
    for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end].rstrip(b"\r"), buffer[end + 1 :]
            if not line:
                if data and any(data):
                    yield b"\n".join(data)
                data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if data and any(data):
        yield b"\n".join(data)


def event(data: bytes) -> bytes:
    return b"event: message\ndata: " + data + b"\n\n"
