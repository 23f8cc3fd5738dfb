"""Values from outside in log lines and error messages: one line each, escaped, bounded.

Whatever a client or an upstream chose (a decoded path, a JSON-RPC method, a
server id, a header, a child's stderr) must not be able to start a log line
of its own or fill the log: `clean` escapes every character that is not
printable (C0 and C1 controls, DEL, the line and paragraph separators U+2028
and U+2029, NEL U+0085, and the other invisible ones, bidi overrides
included) as `\\r`, `\\n`, `\\t`, `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`, and cuts a
value over `limit` characters, saying how much was cut. `OneLineFormatter`,
which `configure_logging` installs, does the same to the message of every
record, so no call site has to remember; the traceback of a real bug, added
after the message, keeps its lines.

The common value is short and printable, and costs one `str.isprintable`
(C speed) and one length check: the access line is on the hot path.
"""

from __future__ import annotations

import logging

# Per value: enough for any real path, method or id; a 4 MiB method name is not logged whole.
LIMIT = 256
# Per log message (several values and the gateway's own words).
MESSAGE_LIMIT = 4096

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean(value: str, limit: int = LIMIT) -> str:
    """`value` as text that holds no line break or control character and is at most about `limit` long."""
    cut = len(value) - limit
    if cut > 0:
        value = value[:limit]
    if not value.isprintable():
        value = "".join(char if char.isprintable() else _escape(char) for char in value)
    return f"{value}…[{cut} more characters]" if cut > 0 else value


def bound(value: str, limit: int = LIMIT) -> str:
    """`value` cut to `limit` characters with a marker; for output that escapes on its own (JSON)."""
    cut = len(value) - limit
    return f"{value[:limit]}…[{cut} more characters]" if cut > 0 else value


def quoted(value: object, limit: int = LIMIT) -> str:
    """`value` as an error message echoes it: 'text' for a string, else its repr; escaped and bounded."""
    if isinstance(value, str):
        return f"'{clean(value, limit)}'"
    return clean(repr(value), limit)


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class OneLineFormatter(logging.Formatter):
    """A Formatter whose records' messages are `clean`ed: one line each, bounded."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() has set record.message from msg % args; the traceback is added after this.
        record.message = clean(record.message, MESSAGE_LIMIT)
        return super().formatMessage(record)
