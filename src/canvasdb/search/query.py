"""What the user typed, read as web-search syntax, and the typo rules applied to it.

``"red car" OR truck -draft bus`` reads as three groups that should match (the
phrase or the word, then ``bus``) and one that must not. A group is what the
ranking counts as a "query word". The last word, when the user has not finished it
(no space after it), matches as a prefix, so results follow the typing.

Words are runs of letters and digits: nothing the user types ever reaches
``to_tsquery`` except such runs joined by operators built here, so quotes,
backslashes and tsquery operators (``& | ! :*``) in a query are inert text.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from rapidfuzz.distance import OSA

WORD = re.compile(r"[^\W_]+")
TOKEN = re.compile(r'-?"[^"]*"?|\S+')
MAX_GROUPS = 10  # like Meilisearch, words beyond the tenth are ignored
MAX_WORD_CHARS = 40
MAX_CORRECTIONS = 8  # per word


@dataclass(frozen=True)
class Term:
    """One word, or the words of a quoted phrase (which must appear next to each other)."""

    words: tuple[str, ...]
    phrase: bool = False
    prefix: bool = False

    def tsquery(self) -> str:
        """The term as to_tsquery text (letters and digits joined by operators built here)."""
        return " <-> ".join(self.words) if self.phrase else self.words[0] + (":*" if self.prefix else "")


@dataclass(frozen=True)
class Group:
    """Terms joined by OR: the group matches when any of them does."""

    terms: tuple[Term, ...]


@dataclass
class ParsedQuery:
    groups: list[Group] = field(default_factory=list)
    excluded: list[Term] = field(default_factory=list)
    ignored: int = 0  # groups beyond MAX_GROUPS
    meaning: str = ""  # the text without its -exclusions: what semantic search embeds

    @property
    def empty(self) -> bool:
        """No words to match (there may still be exclusions)."""
        return not self.groups

    def unless(self) -> str | None:
        """The excluded terms as one to_tsquery text (any of them), or None."""
        return " | ".join(f"({t.tsquery()})" for t in self.excluded) or None

    def words(self) -> list[str]:
        """The single words a typo could be corrected in (not phrases, not excluded ones)."""
        return [t.words[0] for g in self.groups for t in g.terms if not t.phrase]


def parse(text: str) -> ParsedQuery:
    """Read a query in websearch syntax: quotes for phrases, OR, and -word to exclude."""
    out = ParsedQuery()
    pending_or = False
    tokens = TOKEN.findall(text)
    open_end = bool(text) and not text[-1].isspace() and text[-1] != '"'  # still typing the last word
    meant = []
    for i, token in enumerate(tokens):
        if token == "OR":
            pending_or = bool(out.groups)
            meant.append(token)
            continue
        negated = token.startswith("-") and len(token) > 1
        body = token[1:] if negated else token
        quoted = body.startswith('"')
        words = tuple(w.lower()[:MAX_WORD_CHARS] for w in WORD.findall(body))
        if not (negated and words):
            meant.append(token)
        if not words:
            continue
        phrase = len(words) > 1  # "red car", and also e-mail or don't, as websearch_to_tsquery reads them
        last = i == len(tokens) - 1
        term = Term(words, phrase=phrase, prefix=last and open_end and not (phrase or quoted or negated))
        if negated:
            out.excluded.append(Term(term.words, phrase=term.phrase))
        elif pending_or:
            out.groups[-1] = Group((*out.groups[-1].terms, term))
        else:
            out.groups.append(Group((term,)))
        pending_or = False
    out.meaning = " ".join(meant)
    if len(out.groups) > MAX_GROUPS:
        out.ignored = len(out.groups) - MAX_GROUPS
        del out.groups[MAX_GROUPS:]
    return out


def allowed_typos(word: str) -> int:
    """Meilisearch's rule: 1-4 letters exact, 5-8 letters one typo, 9 or more two."""
    n = len(word)
    return 0 if n <= 4 else 1 if n <= 8 else 2


def one_typo_away(word: str) -> set[str]:
    """Every string one typo from ``word`` (deleted, swapped, replaced or inserted letter).

    A 5-8 letter word may have only one typo, so its corrections are all among these,
    found by exact lookups, which trigram similarity alone would miss for short words
    (a swap in a 5-letter word shares a fifth of its trigrams). A first-letter typo
    costs two, so for those words the first letter stays.
    """
    keep = 1 if allowed_typos(word) == 1 else 0
    letters = set(string.ascii_lowercase) | set(word)
    head, tail = word[:keep], word[keep:]
    out = set()
    for i in range(len(tail) + 1):
        left, right = tail[:i], tail[i:]
        if right:
            out.add(head + left + right[1:])
            out.update(head + left + c + right[1:] for c in letters)
        if len(right) > 1:
            out.add(head + left + right[1] + right[0] + right[2:])
        out.update(head + left + c + right for c in letters)
    out.discard(word)
    return out


def typo_cost(word: str, term: str) -> int:
    """Typos between what was typed and a dictionary word.

    Optimal string alignment distance (an insertion, deletion, substitution or swap of
    two adjacent letters is one typo), plus one when the first letter differs: a typo
    on the first letter counts as two.
    """
    return OSA.distance(word, term) + (word[:1] != term[:1])


def slip(word: str, term: str) -> int:
    """How unlikely it is that ``term`` was meant when ``word`` was typed, among corrections of
    as many typos: 0 when a letter was left out or two were swapped, 1 otherwise.

    A left-out letter or a swap is one slip of the fingers; a wrong or an extra letter must
    also be that very letter, one of 26: for the same typed word, the first kind of
    correction is the likelier by far.
    """
    if len(term) == len(word) + 1 or (len(term) == len(word) and sorted(term) == sorted(word)):
        return 0
    return 1


def corrections(word: str, candidates: list[str], limit: int = MAX_CORRECTIONS) -> list[tuple[str, int, int]]:
    """The dictionary words within the typos allowed for ``word``, with their typos and
    slips: fewest typos first, then the likelier slips. Each word once (a 9+ letter word's
    candidates come from two lookups), and only words of letters and digits (what may
    reach ``to_tsquery``)."""
    allowed = allowed_typos(word)
    if not allowed:
        return []
    found = []
    for term in dict.fromkeys(candidates):
        if term == word or not WORD.fullmatch(term):
            continue
        cost = typo_cost(word, term)
        if cost <= allowed:
            found.append((cost, slip(word, term), term))
    found.sort()
    return [(term, cost, sl) for cost, sl, term in found[:limit]]
