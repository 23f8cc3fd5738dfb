"""A custom auth hook the tests name in a registry (gateway.auth.hook)."""

from __future__ import annotations

from gateway.protocol import Headers


def team_header(server_id: str, headers: Headers) -> str | None:
    """Let the blue team in, to every server; anyone else is up to the tokens."""
    return "blue-team" if headers.get("X-Team") == "blue" else None


NOT_CALLABLE = 42


# The header the hook reads carries a credential: the gateway never forwards it.
team_header.credential_headers = ("X-Team",)  # type: ignore[attr-defined]
