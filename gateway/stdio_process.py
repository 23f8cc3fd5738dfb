"""One stdio MCP server process: spawn, handshake, exchange lines, stop.

A process is started by processes.spawn (argv, own process group, minimal
environment). At spawn it is asked `server/discover`;
a modern answer means it speaks 2026-07-28, anything else means the legacy
era and one `initialize` handshake. Reads and writes run in the calling
thread on non-blocking pipes with a deadline (and a request's
cancellation, which cuts a wait short), so a hung child costs a timeout,
never a hung worker; or, for an answer the worker's loop relays, as whole
lines of what is there (`fill`, `next_line`, `sort`) without blocking. stderr is drained by a thread into the log.
Every failure of the child's pipes becomes a gateway error here.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from . import errors, jsonrpc, processes, protocol
from .cancel import Cancellation
from .registry import StdioSettings

log = logging.getLogger(__name__)

# Era detection: a server that stays silent this long after server/discover is legacy.
DISCOVER_TIMEOUT = 3.0
_DISCOVER_ID = "mcp-gateway-discover"
_REDISCOVER_ID = "mcp-gateway-discover-again"
_INITIALIZE_ID = "mcp-gateway-initialize"


def child_environment(settings: StdioSettings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    return processes.environment(settings.env_vars, settings.inherit_env, environ)


class StdioProcess:
    """A running child and the protocol era it speaks."""

    def __init__(self, server_id: str, settings: StdioSettings):
        self.server_id = server_id
        self.settings = settings
        self._popen = processes.spawn(
            server_id, settings.command, env=child_environment(settings), cwd=settings.working_dir,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self._popen.pid
        assert self._popen.stdin and self._popen.stdout and self._popen.stderr
        self._stdin = self._popen.stdin.fileno()
        self._stdout = self._popen.stdout.fileno()
        os.set_blocking(self._stdin, False)
        os.set_blocking(self._stdout, False)
        self._buffer = bytearray()
        self._scanned = 0
        self._closed = False
        self._close_lock = threading.Lock()
        self.hello: protocol.ServerHello | None = None
        # Ids of requests cancelled without an answer yet: a late answer to one is dropped,
        # and a later request reusing such an id is sent under a fresh id (upstreams/stdio.py).
        self.cancelled: set[Any] = set()
        self._stderr_thread = processes.log_lines(self._popen.stderr, server_id, self.pid)

    @property
    def era(self) -> str:
        return self.hello.era if self.hello else protocol.LEGACY

    def alive(self) -> bool:
        return not self._closed and self._popen.poll() is None

    # --- handshake -----------------------------------------------------------

    def handshake(self, deadline: float) -> protocol.ServerHello:
        """Learn the era with server/discover, else initialize once."""
        self.send(jsonrpc.encode(protocol.discover_request(_DISCOVER_ID)), deadline)
        reply = self._await(_DISCOVER_ID, min(deadline, time.monotonic() + DISCOVER_TIMEOUT), silence_ok=True)
        self.hello = protocol.hello_from_discover(reply.get("result") if reply else None)
        if self.hello is not None:
            return self.hello
        self.send(jsonrpc.encode(protocol.initialize_request(_INITIALIZE_ID)), deadline)
        reply = self._await(_INITIALIZE_ID, deadline, silence_ok=False)
        result = reply.get("result") if reply else None
        if not isinstance(result, dict):
            # A 2026-07-28 server slow to start (a loaded machine) answers discover after
            # the silence timeout, then refuses initialize: now that it is up, ask again.
            self.send(jsonrpc.encode(protocol.discover_request(_REDISCOVER_ID)), deadline)
            again = self._await(_REDISCOVER_ID, min(deadline, time.monotonic() + DISCOVER_TIMEOUT), silence_ok=True)
            self.hello = protocol.hello_from_discover(again.get("result") if again else None)
            if self.hello is not None:
                return self.hello
            raise errors.SpawnFailed(
                f"server '{self.server_id}': process {self.pid} refused initialize: {json.dumps(reply.get('error') if reply else None)}"
            )
        self.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}', deadline)
        self.hello = protocol.hello_from_initialize(result)
        return self.hello

    def _await(self, request_id: str, deadline: float, silence_ok: bool) -> dict[str, Any] | None:
        try:
            for message, _raw in self.messages(request_id, deadline):
                if "method" not in message:
                    return message
        except errors.UpstreamTimeout:
            if silence_ok and self.alive():
                return None
            raise
        return None

    # --- exchanging messages -------------------------------------------------

    @property
    def stdout(self) -> int:
        """The descriptor of the child's stdout (non-blocking), for a loop to watch."""
        return self._stdout

    def send(self, data: bytes, deadline: float, cancel: Cancellation | None = None) -> None:
        """Write one message line; a child that stops reading costs a timeout."""
        view = memoryview(data + b"\n")
        while view:
            try:
                written = os.write(self._stdin, view)
            except BlockingIOError:
                self._wait(self._stdin, select.POLLOUT, deadline, "accept the request", cancel)
                continue
            except (BrokenPipeError, OSError):
                raise self.exited("while the request was being written") from None
            view = view[written:]

    def messages(self, request_id: Any, deadline: float,
                 cancel: Cancellation | None = None) -> Iterator[tuple[dict[str, Any], bytes]]:
        """Yield what the child writes until the response to `request_id` (see `sort`), the response last."""
        while True:
            raw = self._read_line(deadline, cancel)
            message = self.sort(raw, request_id, deadline)
            if message is None:
                continue
            yield message, raw
            if "method" not in message:
                return

    def sort(self, raw: bytes, request_id: Any, deadline: float) -> dict[str, Any] | None:
        """One line the child wrote, for the request `request_id`: a notification, its response, or None.

        Server->client requests are answered with an error at once (a pooled
        process has no client to ask); late answers to cancelled requests and
        strays are dropped (None). ProcessFailed for what is not a JSON-RPC message.
        """
        try:
            message = json.loads(raw)
        except ValueError:
            raise errors.ProcessFailed(
                f"server '{self.server_id}': process {self.pid} wrote non-JSON to stdout: {raw[:200]!r}"
            ) from None
        if not isinstance(message, dict):
            raise errors.ProcessFailed(
                f"server '{self.server_id}': process {self.pid} wrote a non-object JSON-RPC message: {raw[:200]!r}"
            )
        if "method" in message:
            if "id" in message:
                self._refuse(message, deadline)
                return None
            return message
        if message.get("id") == request_id:
            return message
        if self.cancelled and hashable_id(message.get("id")) and message.get("id") in self.cancelled:
            self.cancelled.discard(message.get("id"))
            log.info("server %s pid %s: dropped the answer to cancelled request %r", self.server_id, self.pid, message.get("id"))
        elif message.get("id") == _DISCOVER_ID:  # the late answer handshake() asks for again
            log.info("server %s pid %s: answered server/discover after %.0fs", self.server_id, self.pid, DISCOVER_TIMEOUT)
        else:
            log.warning("server %s pid %s: dropped a response to unknown id %r", self.server_id, self.pid, message.get("id"))
        return None

    def _refuse(self, message: dict[str, Any], deadline: float) -> None:
        log.info("server %s pid %s: refused server->client request %s", self.server_id, self.pid, message["method"])
        reply = jsonrpc.error(
            message["id"], errors.METHOD_NOT_FOUND,
            f"{message['method']} is not available: the MCP gateway pools this process and has no client to ask",
        )
        self.send(jsonrpc.encode(reply), deadline)

    def _read_line(self, deadline: float, cancel: Cancellation | None = None) -> bytes:
        while True:
            line = self.next_line()
            if line is not None:
                return line
            self._wait(self._stdout, select.POLLIN, deadline, "answer", cancel)
            if self.fill():
                raise self.exited("before it answered")

    def next_line(self) -> bytes | None:
        """The next whole non-blank line already read (without its newline), or None; ProcessFailed past max_line_bytes."""
        limit = self.settings.max_line_bytes
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline < 0:
                self._scanned = len(self._buffer)
                if self._scanned > limit:
                    raise self._too_long()
                return None
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            self._scanned = 0
            if len(line) > limit:
                raise self._too_long()
            if line.strip():
                return line

    def fill(self) -> bool:
        """Read what the child wrote, without blocking; True when its stdout ended."""
        try:
            chunk = os.read(self._stdout, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            return True
        self._buffer += chunk
        return False

    def _wait(self, fd: int, event: int, deadline: float, doing: str, cancel: Cancellation | None = None) -> None:
        if cancel is not None:
            cancel.check(self.server_id)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            poller = select.poll()
            poller.register(fd, event | select.POLLERR | select.POLLHUP)
            if cancel is not None:
                poller.register(cancel.fileno(), select.POLLIN)
            ready = poller.poll(remaining * 1000)
            if cancel is not None:
                cancel.check(self.server_id)  # cancelled while waiting: before whatever the child did
            if ready:
                return
        raise errors.UpstreamTimeout(f"server '{self.server_id}': process {self.pid} did not {doing} in time")

    def _too_long(self) -> errors.ProcessFailed:
        return errors.ProcessFailed(
            f"server '{self.server_id}': process {self.pid} wrote a line over {self.settings.max_line_bytes} bytes"
        )

    def exited(self, when: str, wait: float = 0.5) -> errors.ProcessFailed:
        """The failure of a child whose pipe ended; `wait` 0 (the loop's thread) does not wait for its exit."""
        try:
            code = self._popen.wait(timeout=wait) if wait else self._popen.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "closed its stdout"
        else:
            how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        return errors.ProcessFailed(f"server '{self.server_id}': process {self.pid} {how} {when}")

    # --- stopping ------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the group from another thread; the pipes stay with the thread using them."""
        processes.kill(self._popen)

    def close(self, grace: float = 2.0) -> None:
        """Close stdin, wait; SIGTERM the group, wait; SIGKILL the group; reap.

        `grace` 0 is for a process that already misbehaved: kill at once.
        """
        # A busy process may be closed by shutdown and by its request thread at
        # once; the lock makes the second call a no-op.
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        processes.stop(self._popen, grace)
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        self._stderr_thread.join(timeout=1.0)


def hashable_id(value: Any) -> bool:
    """A JSON-RPC id that can be looked up in a set (a string or an integer)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)
