"""Hashtag -> WordNet noun synset: synonyms merged into one canonical hashtag, non-nouns dropped.

The rules (issue 4): (1) a tag's key is its text NFKC-normalized, NFKD-decomposed without combining marks,
casefolded, and stripped to ASCII letters and digits; (2) a noun lemma matches when its key equals the tag's,
and the candidates are the matching lemmas' synsets in WordNet's sense order; (3) with no match, WordNet's noun
morphology on the key (``cars`` -> ``car``, ``geese`` -> ``goose``), then the same suffix rules against lemma
keys, which finds squashed multiword plurals (``polarbears`` -> ``polarbear``); (4) the sense: ``concrete-first``
takes the first candidate from a lexicographer file of photographable things, else the first candidate;
``first`` takes the first; (5) no candidate, or a key of digits only: None.

Why a tag names no synset is kept as a negative code (``DROP_REASONS[-code]``) in the same memo as the synset
rows, so the vocabulary builder counts dropped hashtags by reason at no extra cost per tag.

Speed: every rule runs over the precomputed :class:`~fastpretrain.hashtags.wordnet.NounTable`, never through
nltk. The floor is one dict lookup per tag (about 50 ns); normalizing a tag costs about 1 us, so answers are
memoized per raw tag in a bounded dict. Hashtags follow a heavy-tailed distribution, so after warm-up nearly
every lookup is a memo hit: the predicted rate is several million lookups per second per core
(``bench/test_bench_hashtags.py`` measures it against the unmemoized path).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container

from fastpretrain.hashtags.wordnet import CONCRETE_LEXNAMES, NounTable, noun_table

SENSE_RULES = ("concrete-first", "first")
# nltk's noun rules (WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS), in its order: the first that lands on a
# lemma wins, as in nltk's morphy.
NOUN_SUFFIX_RULES = (
    ("s", ""),
    ("ses", "s"),
    ("ves", "f"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)
# Longer tags are never nouns (WordNet's longest lemma key has 64 characters) and are dropped before any
# normalization, so a 10,000-character tag costs nothing and is not memoized.
MAX_TAG_CHARS = 128
# Memo entries (raw tag -> answer) before the memo is cleared: about 30 MB, so memory stays bounded whatever
# the number of distinct raw hashtags, and the frequent tags are back in it within a few thousand posts.
MEMO_LIMIT = 1 << 18

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
# Negative codes: why a tag has no synset. DROP_REASONS[-code] names the reason (index 0 is no reason).
NOT_A_NOUN = -1  # letters in the key, but no WordNet noun matches it
NO_LETTERS_OR_DIGITS = -2  # emoji, symbols, punctuation only: an empty key
DIGITS_ONLY = -3
TAG_TOO_LONG = -4
DROP_REASONS = ("", "not_a_noun", "no_letters_or_digits", "digits_only", "tag_too_long")


def hashtag_key(tag: str) -> str:
    """Rule 1: ``#Ice-Cream``, ``ice cream``, ``##IceCream`` -> ``icecream``; ``#café`` -> ``cafe``."""
    if tag.isascii():  # NFKC, NFKD and casefold are the identity or lower() on ASCII: skip them
        return _NOT_ALNUM.sub("", tag.lower())
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", tag)).casefold()
    # Dropping everything outside [a-z0-9] also drops the combining marks NFKD split off.
    return _NOT_ALNUM.sub("", text)


class Canonicalizer:
    """Maps hashtags to WordNet 3.0 noun synsets (rules in the module docstring).

    ``canonical(tag)`` gives the wnid (``"n%08d" % offset``) or None; ``synset(tag)`` gives the synset's row in
    the noun table, or a negative code naming why there is none (``DROP_REASONS[-code]``); ``codes(tags)`` gives
    that for each tag of a post, the cheap form the vocabulary builder counts with.
    """

    def __init__(self, sense: str = "concrete-first", table: NounTable | None = None) -> None:
        if sense not in SENSE_RULES:
            raise ValueError(f"sense must be one of {', '.join(SENSE_RULES)}, got {sense!r}")
        self.sense = sense
        self.table = table if table is not None else noun_table()
        choose = self._first_concrete if sense == "concrete-first" else self._first
        self._synset_of_key = {key: choose(senses) for key, senses in zip(self.table.keys, self.table.senses)}
        self._lemma_keys = frozenset(k for k, is_lemma in zip(self.table.keys, self.table.is_lemma) if is_lemma)
        self._memo: dict[str, int] = {}

    def _first(self, senses: list[int]) -> int:
        return senses[0]

    def _first_concrete(self, senses: list[int]) -> int:
        lexnames = self.table.lexnames
        return next((s for s in senses if lexnames[s] in CONCRETE_LEXNAMES), senses[0])

    def canonical(self, tag: str) -> str | None:
        """The wnid of ``tag``'s synset, or None when it names no noun."""
        synset = self.synset(tag)
        return None if synset < 0 else self.table.wnid(synset)

    def synset(self, tag: str) -> int:
        """The noun table row of ``tag``'s synset, or a negative code: why it has none (see ``DROP_REASONS``)."""
        found = self._memo.get(tag)
        if found is not None:
            return found
        if len(tag) > MAX_TAG_CHARS:
            return TAG_TOO_LONG
        found = self.synset_of_key(hashtag_key(tag))
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[tag] = found
        return found

    def codes(self, tags: list[str]) -> list[int]:
        """``synset(tag)`` for each of ``tags``, in order (the hot loop of ``vocab build``)."""
        found = list(map(self._memo.get, tags))  # the common case: every tag already memoized
        if None in found:
            found = list(map(self.synset, tags))
        return found

    def synset_of_key(self, key: str) -> int:
        """Rules 2-5 for an already normalized key: a synset row, or a negative code (see ``DROP_REASONS``)."""
        if not key:
            return NO_LETTERS_OR_DIGITS
        if key.isdigit():
            return DIGITS_ONLY
        exact = self._synset_of_key.get(key)
        if exact is not None:
            return exact
        base = self._morphy(key) or self._suffix_base(key)
        return NOT_A_NOUN if base is None else self._synset_of_key.get(base, NOT_A_NOUN)

    def _morphy(self, key: str) -> str | None:
        """nltk's ``morphy(key, "n")`` over the table: irregular plurals, else the suffix rules onto lemmas."""
        bases = self.table.exceptions.get(key)
        if bases is not None:  # as in nltk, an irregular form gets no suffix rules; its bases are noun lemmas
            return bases[0] if bases else None
        return self._suffix_base(key, self._lemma_keys)

    def _suffix_base(self, key: str, targets: Container[str] | None = None) -> str | None:
        """The first suffix rule's base that is in ``targets`` (default: every lemma key)."""
        targets = self._synset_of_key if targets is None else targets
        for old, new in NOUN_SUFFIX_RULES:
            if key.endswith(old):
                base = key[: len(key) - len(old)] + new
                if base in targets:
                    return base
        return None
