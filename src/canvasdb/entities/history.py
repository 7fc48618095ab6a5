"""Version deltas: RFC 6902 patches between versions and RFC 7396 merge patches from clients.

A version row holds the patch from its predecessor; every K versions it also holds
a keyframe (the full document), so rebuilding any version applies at most K-1
patches to the nearest keyframe at or before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jsonpatch

Json = Any


def merge_patch(target: Json, patch: Json) -> Json:
    """RFC 7396: objects merge recursively, ``null`` removes a member, anything else replaces.

    The result shares unchanged values with ``target`` and new ones with ``patch``.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def same(a: Json, b: Json) -> bool:
    """JSON equality: unlike Python's ``==``, ``1``, ``1.0`` and ``true`` differ."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def diff(old: Json, new: Json, path: str = "") -> list[dict[str, Json]]:
    """An RFC 6902 patch that turns ``old`` into ``new``.

    Objects are compared member by member; anything else that differs (arrays
    included) is replaced whole: short patches for the common edits, computed in
    one pass, always exact.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Json]] = [
            {"op": "remove", "path": f"{path}/{_escape(k)}"} for k in old if k not in new
        ]
        for key, value in new.items():
            where = f"{path}/{_escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": where, "value": value})
            else:
                ops.extend(diff(old[key], value, where))
        return ops
    return [] if same(old, new) else [{"op": "replace", "path": path, "value": new}]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


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
