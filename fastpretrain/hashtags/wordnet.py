"""WordNet 3.0 for canonicalization: finding it, reading its nouns once with nltk, caching what we derive.

Where WordNet is looked for, in order: ``$FASTPRETRAIN_WORDNET`` (a WordNet folder holding ``data.noun``, or an
nltk data folder holding ``corpora/wordnet``), then the folders of ``$NLTK_DATA`` and nltk's own data path (which
includes the virtual environment's ``sys.prefix/nltk_data``, the folder ``make wordnet`` fills).

Reading all 82,115 noun synsets through nltk takes several seconds, so the table the canonicalizer needs (one
row per distinct lemma key, see :mod:`fastpretrain.hashtags.canonical`) is derived once and cached as JSON under
``formats.files.cache_root()`` (``$FASTPRETRAIN_CACHE``, default ``~/.cache/fastpretrain``), in a file named by ``TABLE_VERSION`` and a
fingerprint of the WordNet files, so another WordNet or a change to the derivation gets its own table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write, cache_root
from fastpretrain.formats.vocab import WORDNET_VERSION

WORDNET_ENV = "FASTPRETRAIN_WORDNET"
# Bump when the derived table's content or layout changes: old cache files are then ignored.
TABLE_VERSION = 1
_FILES = ("data.noun", "index.noun", "noun.exc", "lexnames")

# Lexicographer files of things one can photograph: the `concrete-first` sense rule prefers them.
CONCRETE_LEXNAMES = frozenset(
    ["noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object", "noun.plant"]
)

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def lemma_key(name: str) -> str:
    """The key of a WordNet lemma name (``ice_cream`` -> ``icecream``, ``jack-o'-lantern`` -> ``jackolantern``).

    Lemma names are ASCII, so this is the tag key's rule restricted to ASCII (see ``canonical.hashtag_key``).
    """
    return _NOT_ALNUM.sub("", name.lower())


def install_help() -> str:
    """How to install WordNet 3.0 for nltk on a machine without nltk's downloader."""
    lexnames = resources.files("fastpretrain.assets").joinpath("wordnet-lexnames")
    return (
        "install it with `make wordnet`, or: `apt-get install wordnet-base wordnet-sense-index`, "
        "`mkdir -p DIR/corpora/wordnet && cp -r /usr/share/wordnet/. DIR/corpora/wordnet/`, "
        f"`cp {lexnames} DIR/corpora/wordnet/lexnames` (Debian's package lacks it), "
        f"then set NLTK_DATA=DIR or {WORDNET_ENV}=DIR/corpora/wordnet"
    )


@dataclass(frozen=True)
class WordNetLocation:
    """A WordNet found on disk: nltk's path pointer to its folder (a real folder or one inside a zip)."""

    pointer: Any  # nltk.data.PathPointer

    def fingerprint(self) -> str:
        """A short hash of the files' names and sizes: different WordNet data, different derived tables."""
        from nltk.data import FileSystemPathPointer

        if isinstance(self.pointer, FileSystemPathPointer):
            root = Path(self.pointer.path)
            parts = [f"{name}:{(root / name).stat().st_size}" for name in _FILES]
        else:  # a zip file (what nltk's downloader installs)
            parts = [f"zip:{Path(self.pointer.zipfile.filename).stat().st_size}:{self.pointer.entry}"]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def _search_roots() -> list[str]:
    import nltk.data

    env = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    roots = env + [str(p) for p in nltk.data.path]
    return list(dict.fromkeys(roots))


def _trust(folder: Path) -> None:
    """nltk refuses to read outside its data roots: a folder the user named explicitly becomes one."""
    import nltk.data

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))


def _check_files(pointer: Any, where: str) -> None:
    for name in _FILES:
        try:
            pointer.join(name)
        except OSError:
            if name == "lexnames":
                lexnames = resources.files("fastpretrain.assets").joinpath("wordnet-lexnames")
                raise UserError(
                    f"WordNet at {where} lacks its `lexnames` file (Debian's package has none): "
                    f"copy {lexnames} there as `lexnames`"
                ) from None
            raise UserError(f"WordNet at {where} lacks {name}; {install_help()}") from None


def find_wordnet() -> WordNetLocation:
    """Locate WordNet (see the module docstring); UserError saying how to install it when there is none."""
    import nltk.data

    explicit = os.environ.get(WORDNET_ENV)
    if explicit:
        folder = Path(explicit).expanduser().resolve()
        if (folder / "data.noun").is_file():
            _trust(folder)
            pointer = nltk.data.FileSystemPathPointer(str(folder))
        elif (folder / "corpora" / "wordnet").is_dir():
            _trust(folder)
            pointer = nltk.data.find("corpora/wordnet", paths=[str(folder)])
        else:
            raise UserError(f"{WORDNET_ENV}={explicit}: no WordNet there (no data.noun, no corpora/wordnet); "
                            f"{install_help()}")
        _check_files(pointer, str(folder))
        return WordNetLocation(pointer)
    roots = _search_roots()
    try:
        pointer = nltk.data.find("corpora/wordnet", paths=roots)
    except LookupError:
        raise UserError(f"WordNet {WORDNET_VERSION} for nltk not found (looked in {', '.join(roots)}); "
                        f"{install_help()}") from None
    _check_files(pointer, getattr(pointer, "path", str(pointer)))
    return WordNetLocation(pointer)


def open_wordnet(location: WordNetLocation):
    """nltk's reader over ``location`` (several seconds: it parses the index files)."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": we use English only
        reader = WordNetCorpusReader(location.pointer, None)
    version = reader.get_version()
    if version != WORDNET_VERSION:
        raise UserError(f"WordNet at {location.pointer} is version {version}; {WORDNET_VERSION} is needed "
                        f"(ImageNet's class ids are its synset offsets); {install_help()}")
    return reader


@dataclass(frozen=True)
class NounTable:
    """What canonicalization and vocabularies need from WordNet's nouns, as plain lists.

    Synsets are numbered 0..S-1 in offset order: ``offsets[s]``, ``lexnames[s]`` (its lexicographer file) and
    ``lemmas[s]`` (its lemma names). Keys are numbered 0..K-1: ``keys[k]`` a lemma key, ``senses[k]`` the
    synsets of the lemmas with that key in WordNet's sense order, ``is_lemma[k]`` whether the key is itself a
    noun lemma name (what nltk's morphy can find). ``exceptions`` maps an irregular plural's key to the keys of
    its base forms (WordNet's ``noun.exc``).
    """

    wordnet_version: str
    offsets: list[int]
    lexnames: list[str]
    lemmas: list[list[str]]
    keys: list[str]
    senses: list[list[int]]
    is_lemma: list[bool]
    exceptions: dict[str, list[str]]

    def wnid(self, synset: int) -> str:
        """ImageNet's id of a synset: ``n`` and the 8-digit WordNet 3.0 offset."""
        return f"n{self.offsets[synset]:08d}"

    @functools.cached_property
    def synset_of_wnid(self) -> dict[str, int]:
        """wnid -> synset row, for vocabularies stored by wnid."""
        return {self.wnid(s): s for s in range(len(self.offsets))}


def derive_noun_table(reader) -> NounTable:
    """Read WordNet's nouns through nltk and derive the table (several seconds; cached by :func:`noun_table`)."""
    synsets = list(reader.all_synsets("n"))
    synsets.sort(key=lambda s: s.offset())
    synset_of_offset = {s.offset(): i for i, s in enumerate(synsets)}
    # nltk's parsed index.noun: lemma name -> {pos: synset offsets in sense order}; the public `synsets()`
    # would add morphy's base forms, and each lemma's own senses are what rule 2 asks for.
    senses_of_lemma = {
        name: [synset_of_offset[o] for o in by_pos["n"]]
        for name, by_pos in reader._lemma_pos_offset_map.items()
        if "n" in by_pos
    }
    lemmas_of_key: dict[str, list[str]] = {}
    for name in sorted(senses_of_lemma):
        lemmas_of_key.setdefault(lemma_key(name), []).append(name)
    keys = sorted(k for k in lemmas_of_key if k)
    senses = []
    for key in keys:
        # Several lemmas with one key: interleave their senses by rank, first senses first.
        per_lemma = [senses_of_lemma[name] for name in lemmas_of_key[key]]
        merged: dict[int, None] = {}
        for rank in range(max(map(len, per_lemma))):
            for lemma_senses in per_lemma:
                if rank < len(lemma_senses):
                    merged.setdefault(lemma_senses[rank], None)
        senses.append(list(merged))
    lemma_names = set(senses_of_lemma)
    exceptions = {
        form: [lemma_key(base) for base in bases if base in lemma_names]
        for form, bases in reader._exception_map["n"].items()
        if form == lemma_key(form)  # morphy runs on keys, so only plain [a-z0-9] forms can ever be looked up
    }
    return NounTable(
        wordnet_version=reader.get_version(),
        offsets=[s.offset() for s in synsets],
        lexnames=[s.lexname() for s in synsets],
        lemmas=[s.lemma_names() for s in synsets],
        keys=keys,
        senses=senses,
        is_lemma=[key in lemma_names for key in keys],
        exceptions=exceptions,
    )


def _table_path(location: WordNetLocation) -> Path:
    return cache_root() / "wordnet" / f"nouns-v{TABLE_VERSION}-{location.fingerprint()}.json"


_TABLES: dict[Path, NounTable] = {}  # per process: the table is read from disk once


def _read_table(path: Path) -> NounTable | None:
    try:
        return NounTable(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent, or not a table of this version: derive it again


def _write_table(path: Path, table: NounTable) -> None:
    try:  # atomic: parallel first runs each put a whole file in place
        with atomic_write(path, "w") as f:
            json.dump({name: getattr(table, name) for name in NounTable.__dataclass_fields__}, f)
    except OSError:
        pass  # a read-only cache folder only costs the next run the same derivation


def noun_table() -> NounTable:
    """The noun table of the WordNet found by :func:`find_wordnet`: from the disk cache, else derived and cached."""
    location = find_wordnet()
    path = _table_path(location)
    if path not in _TABLES:
        table = _read_table(path)
        if table is None:
            table = derive_noun_table(open_wordnet(location))
            _write_table(path, table)
        _TABLES[path] = table
    return _TABLES[path]
