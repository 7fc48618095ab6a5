"""Version deltas: RFC 6902 patches between versions and RFC 7396 merge patches from clients.

A version row holds the patch from its predecessor; every K versions it also holds
a keyframe (the full document), so rebuilding any version applies at most K-1
patches to the nearest keyframe at or before it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import jsonpatch

Json = Any


def merge_patch(target: Json, patch: Json) -> Json:
    """RFC 7396: objects merge recursively, ``null`` removes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def diff(old: Json, new: Json) -> list[dict[str, Json]]:
    """An RFC 6902 patch that turns ``old`` into ``new``, checked before it is trusted."""
    ops: list[dict[str, Json]] = jsonpatch.make_patch(old, new).patch
    try:
        if jsonpatch.apply_patch(old, ops) == new:
            return ops
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        pass
    # The differ can miss on some list shapes; a whole-document replace is always right.
    return [{"op": "replace", "path": "", "value": new}]


def apply(doc: Json, ops: list[dict[str, Json]]) -> Json:
    return jsonpatch.apply_patch(doc, ops)


def rebuild(rows: Iterable[dict[str, Any]]) -> Json:
    """The document after the last row: start at the first row's keyframe, apply the patches."""
    doc: Json = None
    for i, row in enumerate(rows):
        if i == 0:
            doc = row["keyframe"]
            if doc is None:
                raise ValueError("history rows must start at a keyframe")
        elif row["patch"]:
            doc = apply(doc, row["patch"])
    return doc
