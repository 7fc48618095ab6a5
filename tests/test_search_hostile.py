"""Hostile search input: each answers a clear 4xx or a correct answer, and no query makes
PostgreSQL match more than the ten words search reads."""

from __future__ import annotations

import string

import httpx
from conftest import Tenant
from test_search import _setup

from canvasdb.search.query import parse
from canvasdb.services import Services


def _word(i: int) -> str:
    """A word of letters only, one per ``i``."""
    letters = ""
    while True:
        i, digit = divmod(i, 26)
        letters += string.ascii_lowercase[digit]
        if not i:
            return "zq" + letters


def test_every_word_counts_towards_the_ten_read() -> None:
    """Alternatives, phrases and exclusions are words too: a query of a thousand alternatives
    (or exclusions, or a phrase of a thousand words) made PostgreSQL match each one on every
    row, seconds to a statement timeout at 20,000 entities."""
    alternatives = parse(" OR ".join(_word(i) for i in range(1000)))
    assert [len(g.terms) for g in alternatives.groups] == [10] and alternatives.ignored == 990
    excluded = parse("plan " + " ".join("-" + _word(i) for i in range(1000)))
    assert len(excluded.excluded) == 9 and excluded.ignored == 991
    phrase = parse('"' + " ".join(_word(i) for i in range(1000)) + '" more')
    (term,) = [t for g in phrase.groups for t in g.terms]
    assert term.words == tuple(_word(i) for i in range(10)) and term.text == " ".join(term.words)
    assert phrase.ignored == 991
    assert parse("a b c d e f g h i j k l").ignored == 2


async def test_a_query_of_a_thousand_alternatives_matches_the_first_ten(svc: Services, tenant: Tenant) -> None:
    first, far = await _setup(svc, tenant, [("note", {"title": _word(3), "body": ""}),
                                            ("note", {"title": _word(500), "body": ""})])
    res = await svc.search.search(tenant.owner, " OR ".join(_word(i) for i in range(1000)) + " ", mode="text")
    assert [h.id for h in res.hits] == [first] and far != first
    assert res.ignored_words == 990


async def test_a_data_filter_nested_too_deep_for_json_is_a_string(client: httpx.AsyncClient, svc: Services,
                                                                  tenant: Tenant) -> None:
    (deep,) = await _setup(svc, tenant, [("note", {"title": "nested", "body": "", "shape": "[" * 5000})])
    res = await client.get(f"/v1/orgs/{tenant.slug}/search", headers=tenant.headers,
                           params={"q": "nested", "mode": "text", "data.shape": "[" * 5000})
    assert res.status_code == 200
    assert [h["id"] for h in res.json()["hits"]] == [str(deep)]
