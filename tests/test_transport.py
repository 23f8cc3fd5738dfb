"""Foreign exceptions become gateway errors in one place (gateway/upstreams/transport.py).

Each case raises the real exception: requests against a raw loopback socket
that refuses, stalls, resets or breaks a stream, or urllib3's own classes where
loopback cannot produce them (a connect timeout, a name that does not resolve).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
import urllib3

from gateway import errors
from gateway.upstreams.transport import Translating, translate

from .harness import free_port

WHERE = "server 'web': instance http://up.test"


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A loopback socket whose one connection `act` handles; yields its URL."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []
    done = threading.Event()

    def make(act: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                act(conn)
                done.wait(5)  # hold the connection open until the test is done with it

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield make
    done.set()
    for thread in threads:
        thread.join(5)
    for listener in listeners:
        listener.close()


def caught(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the test wants whatever it raises
        return exc
    raise AssertionError("nothing was raised")


def read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk


def test_a_refused_connection_is_unreachable() -> None:
    exc = caught(lambda: requests.get(f"http://127.0.0.1:{free_port()}/", timeout=5))
    assert isinstance(exc, requests.ConnectionError)
    error = translate(exc, WHERE, 30)
    assert type(error) is errors.UpstreamUnreachable and error.retry_safe
    assert error.message == f"{WHERE} is unreachable: [Errno 111] Connection refused"


def test_a_connect_timeout_is_unreachable() -> None:
    reason = urllib3.exceptions.ConnectTimeoutError(None, "Connection to up.test timed out. (connect timeout=1)")
    pool_error = urllib3.exceptions.MaxRetryError(None, "/", reason)  # type: ignore[arg-type]
    for exc in (requests.ConnectTimeout(pool_error), requests.ConnectionError(pool_error)):
        error = translate(exc, WHERE, 30)
        assert type(error) is errors.UpstreamUnreachable and error.retry_safe
        assert error.message.startswith(f"{WHERE} is unreachable: ") and "Connection to up.test timed out" in error.message


def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    reason = urllib3.exceptions.NameResolutionError(
        "no-such-host.invalid", None, socket.gaierror(-2, "Name or service not known"))  # type: ignore[arg-type]
    error = translate(requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason)), WHERE, 30)  # type: ignore[arg-type]
    assert type(error) is errors.UpstreamUnreachable
    assert error.message == f"{WHERE} is unreachable: [Errno -2] Name or service not known"


def test_no_answer_in_time_is_a_read_timeout(raw_server: Callable[..., str]) -> None:
    url = raw_server(read_request)  # takes the request, never answers
    exc = caught(lambda: requests.get(url, timeout=(5, 0.2)))
    assert isinstance(exc, requests.ReadTimeout)
    error = translate(exc, WHERE, 0.2)
    assert type(error) is errors.UpstreamReadTimeout and not error.retry_safe
    assert error.message == f"{WHERE} did not answer within 0.2s"


def test_a_stream_that_stalls_is_a_read_timeout(raw_server: Callable[..., str]) -> None:
    def headers_then_silence(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\n")

    response = requests.get(raw_server(headers_then_silence), timeout=(5, 0.2), stream=True)
    exc = caught(lambda: response.raw.read(100))
    assert isinstance(exc, urllib3.exceptions.ReadTimeoutError)
    error = translate(exc, WHERE, 0.2)
    assert type(error) is errors.UpstreamReadTimeout and error.message == f"{WHERE} did not answer within 0.2s"


def test_a_connection_reset_after_the_request_is_a_failure(raw_server: Callable[..., str]) -> None:
    def reset(conn: socket.socket) -> None:
        read_request(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    exc = caught(lambda: requests.post(raw_server(reset), data=b"{}", timeout=5))
    assert isinstance(exc, requests.ConnectionError)
    error = translate(exc, WHERE, 30)
    assert type(error) is errors.UpstreamFailed and not error.retry_safe
    assert error.message.startswith(f"{WHERE} failed: ") and "Connection" in error.message


def test_a_broken_chunked_stream_is_a_failure(raw_server: Callable[..., str]) -> None:
    def broken(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        conn.shutdown(socket.SHUT_WR)

    response = requests.get(raw_server(broken), timeout=5, stream=True)
    exc = caught(lambda: list(response.raw.read_chunked(decode_content=False)))
    assert isinstance(exc, urllib3.exceptions.ProtocolError)
    error = translate(exc, WHERE, 30)
    assert type(error) is errors.UpstreamFailed and error.message.startswith(f"{WHERE} failed: ")


def test_an_os_error_names_its_errno() -> None:
    error = translate(ConnectionResetError(104, "Connection reset by peer"), WHERE, 30)
    assert type(error) is errors.UpstreamFailed
    assert error.message == f"{WHERE} failed: [Errno 104] Connection reset by peer"


def test_a_value_error_from_the_client_library_is_a_failure() -> None:
    exc = caught(lambda: requests.get("http://[::1/", timeout=5))  # urllib3 cannot parse it
    assert isinstance(exc, ValueError) and isinstance(exc, requests.RequestException)
    error = translate(exc, WHERE, 30)
    assert type(error) is errors.UpstreamFailed and error.message.startswith(f"{WHERE} failed: ")
    assert translate(ValueError(), WHERE, 30).message == f"{WHERE} failed: ValueError"


def test_the_guard_translates_foreign_exceptions_and_lets_the_rest_through() -> None:
    guard = Translating(WHERE, 30)
    with pytest.raises(errors.UpstreamFailed, match=r"failed: \[Errno 32\] Broken pipe") as raised, guard:
        raise BrokenPipeError(32, "Broken pipe")
    assert raised.value.__suppress_context__  # the foreign traceback is not chained on
    with pytest.raises(errors.UpstreamUnreachable), guard:
        requests.get(f"http://127.0.0.1:{free_port()}/", timeout=5)
    own = errors.BadStatus("503", None)
    with pytest.raises(errors.BadStatus) as kept, guard:
        raise own
    assert kept.value is own
    with pytest.raises(KeyError), guard:
        raise KeyError("a bug of the gateway's own stays a bug")
    with guard:
        pass  # nothing raised: nothing to do
