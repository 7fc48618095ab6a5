"""What the user typed, read as web-search syntax, and the typo rules applied to it.

``"red car" OR truck -draft bus`` reads as three groups that should match (the
phrase or the word, then ``bus``) and one that must not. A group is what the
ranking counts as a "query word". The last word, when the user has not finished it
(no space after it), matches as a prefix, so results follow the typing.

Splitting a term into words is left to PostgreSQL. Each term (a run of characters
between spaces, or a quoted phrase) reaches ``to_tsquery`` as one quoted operand, its
quotes and backslashes escaped, and ``to_tsquery`` runs on it the parser and the
``english`` configuration that indexed the documents: ``john@example.com``,
``example.com``, ``1.2.3``, ``3.14`` and ``/usr/local/bin`` are one token each there,
and ``İstanbul`` or an Arabic word with its vowel marks keep the letters PostgreSQL
indexed (the C locale lower-cases ASCII only, and reads every other character as a
letter; Python's ``lower()`` and letter runs changed or split them). A term of
several tokens (``e-mail``) becomes their phrase, as in the document. Tsquery
operators (``& | ! :* <->``) inside a term are text: only the operators joining the
terms are built here. Python's own letter runs (``words``) serve the typo rules only.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from rapidfuzz.distance import OSA

WORD = re.compile(r"[^\W_]+")  # the words a typo is looked for in (letters and digits)
# A term can hold a token: ASCII letters, digits and "_" (a path such as "/_"), and any other
# character, which PostgreSQL's parser reads as a letter in the C locale. A term without
# any (punctuation alone) is skipped, as before.
TOKENISH = re.compile(r"[0-9A-Za-z_]|[^\x00-\x7f]")
# After a space, PostgreSQL's parser reads a "." or "~" in front of a path as a blank
# ("see ./run.sh" is indexed as "/run.sh"), at the start of a text as part of it
# ("./run.sh"): a term that starts so is also asked for as it reads after a space.
AFTER_SPACE = (".", "~")
TOKEN = re.compile(r'-?"[^"]*"?|\S+')
MAX_GROUPS = 10  # like Meilisearch, words beyond the tenth are ignored (each costs the SQL a match)
MAX_WORD_CHARS = 40
MAX_CORRECTIONS = 8  # per word


@dataclass(frozen=True)
class Term:
    """One word, or the words of a quoted phrase (which must appear next to each other)."""

    words: tuple[str, ...]  # its runs of letters and digits, lower case (for the typo rules)
    phrase: bool = False
    prefix: bool = False
    text: str = ""  # as typed (a phrase without its quotes): what PostgreSQL splits into tokens

    @property
    def word(self) -> str | None:
        """The one word a typo may be corrected in: None for a phrase or a term without letters."""
        return self.words[0] if len(self.words) == 1 and not self.phrase else None

    def tsquery(self) -> str:
        """The term as to_tsquery text: its text as one quoted operand (``:*`` on every token
        when a prefix), which to_tsquery splits and normalises as to_tsvector did the
        documents; several tokens make a phrase."""
        text = self.text or " ".join(self.words)
        star = ":*" if self.prefix else ""
        operands = [_quoted(text) + star]
        if text.startswith(AFTER_SPACE):
            operands.append(_quoted(" " + text) + star)
        return operands[0] if len(operands) == 1 else "(" + " | ".join(operands) + ")"


def _quoted(text: str) -> str:
    """``text`` as one quoted tsquery operand: quotes doubled, backslashes escaped."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True)
class Group:
    """Terms joined by OR: the group matches when any of them does."""

    terms: tuple[Term, ...]


@dataclass
class ParsedQuery:
    groups: list[Group] = field(default_factory=list)
    excluded: list[Term] = field(default_factory=list)
    ignored: int = 0  # words beyond the first MAX_GROUPS
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
        return [t.word for g in self.groups for t in g.terms if t.word is not None]


def parse(text: str) -> ParsedQuery:
    """Read a query in websearch syntax: quotes for phrases, OR, and -word to exclude."""
    out = ParsedQuery()
    pending_or = False
    taken = 0  # words, of every term: alternatives, phrases and exclusions too
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
        # as typed, for PostgreSQL to split (a NUL cannot be sent: a space, as between words)
        said = (body.strip('"') if quoted else body).replace("\x00", " ").strip()
        tokenish = TOKENISH.search(said) is not None
        if not (negated and tokenish):
            meant.append(token)
        if not tokenish:
            continue
        words = tuple(w.lower()[:MAX_WORD_CHARS] for w in WORD.findall(said))
        left = MAX_GROUPS - taken
        if left <= 0 or len(words) > left:  # past the tenth word: a phrase keeps those before it
            out.ignored += max(1, len(words)) - max(0, left)
            if left <= 0:
                pending_or = False
                continue
            words, said = words[:left], " ".join(words[:left])
        taken += max(1, len(words))
        phrase = len(words) > 1  # "red car", and also e-mail or don't, as websearch_to_tsquery reads them
        last = i == len(tokens) - 1
        # A prefix applies to each token of the term: "e-mai" finds "e-mail".
        term = Term(words, phrase=phrase, prefix=last and open_end and not (quoted or negated), text=said)
        if negated:
            out.excluded.append(Term(term.words, phrase=term.phrase, text=term.text))
        elif pending_or:
            out.groups[-1] = Group((*out.groups[-1].terms, term))
        else:
            out.groups.append(Group((term,)))
        pending_or = False
    out.meaning = " ".join(meant)
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
    candidates come from two lookups), and only words of letters and digits (they reach
    ``to_tsquery`` unquoted)."""
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
