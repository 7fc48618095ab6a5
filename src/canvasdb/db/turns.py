"""Group commits take a backlog's writes in turns by org.

A batch takes what is pending in arrival order, up to its cap. When more is pending than a
batch holds, arrival order would make every org wait behind the org that sent the most: one
org's burst of 10,000 updates put another org's one update ten batches back. So a backlog
is put in turns first: one write of each org, then the next of each, and so on, each org's
own writes staying in their order (and so each document's and each entity's, which belong
to one org).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from itertools import chain, zip_longest
from typing import TypeVar

T = TypeVar("T")
_GAP = object()


def in_turns(items: list[T], org_of: Callable[[T], Hashable]) -> list[T]:
    """``items`` interleaved by org, one at a time, each org's in its order; as they are when
    they are of one org."""
    by_org: dict[Hashable, list[T]] = {}
    for item in items:
        by_org.setdefault(org_of(item), []).append(item)
    if len(by_org) < 2:
        return items
    return [item for item in chain.from_iterable(zip_longest(*by_org.values(), fillvalue=_GAP))
            if item is not _GAP]
