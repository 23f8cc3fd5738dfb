"""How much of a client's HTTP/1.1 request has arrived: the poller reads it whole before a thread serves it.

A gunicorn thread that reads a request blocks until the client has sent it,
so clients that send slowly (or not at all) could hold every thread. The
worker (gateway/worker.py) therefore reads each request in its polling
thread, without blocking, into an `Inbound`, and hands the connection to a
thread only once `complete` says the headers and the whole body are there.
Until then the request has `deadline`: the headers must arrive within
`gateway.header_timeout` of the first byte (of the connection, for a new
one), the body within `gateway.body_timeout` of the end of the headers.

The scan only finds where the request ends; gunicorn's parser still parses
it. Anything it cannot make sense of (no Content-Length number, a bad chunk
size, headers over the parser's own limit) or a body over
`gateway.max_body_bytes` is handed on as it is: the parser answers 400, the
gateway 413, without waiting for the rest.
"""

from __future__ import annotations

import re
import time

# gunicorn's own limits: a request line of 4094 bytes, 100 header fields of 8190.
MAX_HEAD = 4094 + 100 * 8190 + 4
MAX_CHUNK_LINE = 4096
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEADER = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:[ \t]*(.*?)[ \t]*$")


class Inbound:
    """The bytes of one request received so far, and how far the scan has got."""

    __slots__ = (
        "body_end",
        "body_timeout",
        "buffer",
        "chunk_at",
        "chunked",
        "chunked_bytes",
        "continued",
        "deadline",
        "head_end",
        "header_timeout",
        "max_body",
        "started",
        "wants_continue",
    )

    def __init__(self, buffered: bytes, header_timeout: float, body_timeout: float, max_body: int):
        self.buffer = bytearray(buffered)
        self.started = time.monotonic()
        self.deadline = self.started + header_timeout
        self.header_timeout, self.body_timeout, self.max_body = header_timeout, body_timeout, max_body
        self.head_end = -1  # offset just past the blank line ending the headers, once seen
        self.body_end = -1  # with Content-Length: where the body ends
        self.chunked = False
        self.chunk_at = 0  # chunked: where the next chunk-size line starts
        self.chunked_bytes = 0
        self.wants_continue = False  # Expect: 100-continue: the client waits for "100 Continue" to send the body
        self.continued = False  # the worker sent it (so gunicorn must not again)

    @property
    def reading_body(self) -> bool:
        return self.head_end >= 0

    def complete(self) -> bool:
        """Whether the request may go to a thread: all there, or nothing more worth waiting for."""
        if self.head_end < 0 and not self._scan_head():
            return len(self.buffer) > MAX_HEAD  # the parser refuses it at once
        if self.chunked:
            return self._scan_chunks()
        return len(self.buffer) >= self.body_end

    def _scan_head(self) -> bool:
        while self.buffer.startswith(b"\r\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
            del self.buffer[:2]
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        self.head_end = self.body_end = self.chunk_at = end + 4
        self.deadline = time.monotonic() + self.body_timeout
        length: int | None = 0
        for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
            match = _HEADER.match(line)
            if match is None:
                return self._give_up()
            name, value = match[1].lower(), match[2]
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                self.chunked = self.chunked or b"chunked" in value.lower()
            elif name == b"expect" and value.lower() == b"100-continue":
                self.wants_continue = True
        if self.chunked:
            return True
        if length is None or length > self.max_body:
            return self._give_up()
        self.body_end = self.head_end + length
        return True

    def _give_up(self) -> bool:
        """Hand over what is here: gunicorn's parser or the body limit answers it without the rest."""
        self.chunked = False
        self.body_end = self.head_end
        self.wants_continue = False
        return True

    def _scan_chunks(self) -> bool:
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", self.chunk_at)
            if line_end < 0:
                return len(buffer) - self.chunk_at > MAX_CHUNK_LINE
            text = bytes(buffer[self.chunk_at:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(text, 16)
            except ValueError:
                return True  # gunicorn's parser says what is wrong with it
            if size == 0:
                # Then trailer fields, if any, and a blank line: the "\r\n" ending this line starts the match.
                return buffer.find(b"\r\n\r\n", line_end) >= 0
            self.chunked_bytes += size
            if self.chunked_bytes > self.max_body:
                return True  # the gateway's 413, without the rest
            after = line_end + 2 + size + 2
            if after > len(buffer):
                self.chunked_bytes -= size  # counted again when the chunk is whole
                return False
            self.chunk_at = after

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def what(self) -> str:
        """For the log line of a cut client: which part did not arrive in time."""
        if self.head_end < 0:
            return f"request headers not received within {self.header_timeout:g}s ({len(self.buffer)} bytes)"
        return (f"request body not received within {self.body_timeout:g}s "
                f"({len(self.buffer) - self.head_end} bytes of it)")
