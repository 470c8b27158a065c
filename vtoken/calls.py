"""Per-call state: what one forward or generate call of a wrapped model needs lives with that call.

A wrapped model is shared: several threads (a web server, the demo) may call it at once, and
``copy.deepcopy`` may give it a twin. So nothing a call computes (selections, kept positions, captured
signals, the stats it records) is stored on the integration or its site objects. The integration opens
a ``Call`` when a call starts and makes it current for that thread in a ``ContextVar``; every hook it
installed looks the current call up by the integration's own key, and the call's stats are published
to ``model.vtoken.stats`` when it ends. Threads each start with an empty context, so they never see each
other's calls.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .stats import Stats


class CallKey:
    """Identifies one integration's calls. An object, not ``id(integration)``: site objects keep it, and
    ``copy.deepcopy`` of a wrapped model gives the copy's site objects the copy's key with it."""

    def __repr__(self) -> str:
        return f"CallKey({id(self):#x})"


#: the calls in progress in this context, by integration key
_ACTIVE: ContextVar[dict[CallKey, "Call"] | None] = ContextVar("vtoken_active_calls", default=None)


@dataclass
class Call:
    """One forward or generate call of a wrapped model.

    kind:  ``"forward"`` (``model(...)``), ``"generate"`` (``model.generate(...)``, spanning its
           prefill and every decode step) or ``"encoder"`` (a standalone vision encoder's pass).
    parts: the per-call state of each site object, by a name the site object chooses.
    """

    kind: str
    stats: Stats = field(default_factory=Stats)
    parts: dict[str, Any] = field(default_factory=dict)


def current(key: CallKey) -> Call | None:
    """The call of the integration with ``key`` running in this thread (None outside any call)."""
    return (_ACTIVE.get() or {}).get(key)


def begin(key: CallKey, call: Call) -> Call:
    """Make ``call`` the current call of ``key`` in this context until ``end(key, call)``."""
    active = dict(_ACTIVE.get() or {})
    active[key] = call
    _ACTIVE.set(active)
    return call


def end(key: CallKey, call: Call) -> None:
    """Stop ``call`` being current (a no-op when it already is not)."""
    active = _ACTIVE.get() or {}
    if active.get(key) is call:
        rest = dict(active)
        del rest[key]
        _ACTIVE.set(rest)
