"""The callables a registry names by dotted path (`package.module:function`): the auth hook.

Its own module so that both the registry (which checks at load that a hook can
be used) and auth (which calls it) import it, and neither imports the other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import Headers

# (server id, the request's headers) -> the principal's name, or None: not let in.
Hook = Callable[[str, "Headers"], "str | None"]


def load_hook(path: str) -> Hook:
    """`package.module:function` (or `package.module.function`) -> the callable."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    hook: Any = getattr(importlib.import_module(module_name), attribute)
    if not callable(hook):
        raise TypeError(f"auth hook {path!r} is not callable")
    result: Hook = hook
    return result
