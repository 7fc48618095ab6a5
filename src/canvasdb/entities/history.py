"""Rebuilding old versions from history rows.

A version row holds the RFC 6902 patch from its predecessor (computed in SQL by
``jsonb_diff`` when the version is written); every K versions it also holds a
keyframe (the full document), so rebuilding any version applies at most K-1
patches to the nearest keyframe at or before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jsonpatch

Json = Any


def rebuild(rows: Iterable[dict[str, Any]]) -> Json:
    """The document after the last row: start at the first row's keyframe, apply the patches."""
    doc: Json = None
    for i, row in enumerate(rows):
        if i == 0:
            doc = row["keyframe"]
            if doc is None:
                raise ValueError("history rows must start at a keyframe")
        elif row["patch"]:
            doc = jsonpatch.apply_patch(doc, row["patch"])
    return doc
