"""A subscriptions/listen filter and the frames stamped for it, whatever the client or process sends (property tests)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.dedicated import (
    LISTEN_FLAGS,
    MAX_LISTEN_URIS,
    MAX_URI_LENGTH,
    SUBSCRIPTION_ID,
    ListenStream,
    _listen_filter,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
flag_names = st.sampled_from([*LISTEN_FLAGS, "resourceSubscriptions", "other"])
filters = st.dictionaries(flag_names, json_values | st.lists(st.text(max_size=30), max_size=5), max_size=5)
params = json_values | st.fixed_dictionaries({"notifications": filters | json_values})


@settings(max_examples=300, deadline=None, database=None)
@given(params=params)
def test_a_filter_is_taken_within_its_bounds_or_refused_as_invalid_params(params: Any) -> None:
    try:
        flags, uris = _listen_filter(params, "srv", 1)
    except errors.InvalidParams as exc:
        assert exc.message.startswith("server 'srv': subscriptions/listen: ") and exc.rpc_id == 1
        return
    wanted = params["notifications"]
    assert set(flags) == {name for name in LISTEN_FLAGS if wanted.get(name) is True}
    assert list(uris) == list(dict.fromkeys(wanted.get("resourceSubscriptions", [])))
    assert len(uris) <= MAX_LISTEN_URIS and all(0 < len(uri) <= MAX_URI_LENGTH for uri in uris)


@settings(max_examples=300, deadline=None, database=None)
@given(message=st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "result"]), json_values),
       request_id=st.integers() | st.text(max_size=8))
def test_every_stamped_frame_carries_the_listens_id(message: dict[str, Any], request_id: Any) -> None:
    stream = ListenStream.__new__(ListenStream)  # stamping needs no pipe or session
    stream.request_id = request_id
    stamped = stream.stamped(message)
    key = "result" if "result" in message else "params"
    assert stamped[key]["_meta"][SUBSCRIPTION_ID] == request_id
    assert {k: v for k, v in stamped.items() if k != key} == {k: v for k, v in message.items() if k != key}
