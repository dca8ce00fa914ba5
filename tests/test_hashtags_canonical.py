"""Canonicalization rules checked against real WordNet 3.0 read through nltk's public API, and WordNet lookup."""

from __future__ import annotations

import random
import stat
from collections import defaultdict
from pathlib import Path

import nltk.data
import pytest
from nltk.corpus import wordnet as wn

from fastpretrain.errors import UserError
from fastpretrain.formats.files import CACHE_ENV
from fastpretrain.hashtags import canonical, wordnet
from fastpretrain.hashtags.canonical import Canonicalizer, hashtag_key

CONCRETE = {"noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object", "noun.plant"}




@pytest.fixture(scope="module")
def concrete_first() -> Canonicalizer:
    return Canonicalizer("concrete-first")


@pytest.fixture(scope="module")
def first() -> Canonicalizer:
    return Canonicalizer("first", table=wordnet.noun_table())


@pytest.fixture(scope="module")
def lemmas_by_key() -> dict[str, list[str]]:
    """Every noun lemma name by its key, from nltk."""
    by_key = defaultdict(list)
    for name in wn.all_lemma_names("n"):
        by_key["".join(ch for ch in name.lower() if ch.isascii() and ch.isalnum())].append(name)
    return {key: sorted(names) for key, names in by_key.items() if key}


def wnid(synset) -> str:
    return "n%08d" % synset.offset()


def reference_candidates(lemma_names: list[str]) -> list:
    """Rule 2 from nltk: each lemma's own noun senses in order; several lemmas interleaved by sense rank."""
    per_lemma = [[lemma.synset() for lemma in wn.lemmas(name, "n")] for name in lemma_names]
    merged = []
    for rank in range(max(len(senses) for senses in per_lemma)):
        for senses in per_lemma:
            if rank < len(senses) and senses[rank] not in merged:
                merged.append(senses[rank])
    return merged


def reference_choice(candidates: list, sense: str) -> str:
    if sense == "concrete-first":
        return wnid(next((s for s in candidates if s.lexname() in CONCRETE), candidates[0]))
    return wnid(candidates[0])


# --- rule 1: the key -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag, key",
    [
        ("#Ice-Cream", "icecream"),
        ("ice cream", "icecream"),
        ("##IceCream", "icecream"),
        ("#café", "cafe"),
        ("ｃａｒ", "car"),  # fullwidth letters: NFKC
        ("ﬁsh", "fish"),  # a ligature: NFKC
        ("Straße", "strasse"),  # casefold, not lower
        ("crème brûlée", "cremebrulee"),  # combining accents dropped after NFKD
        ("jack-o'-lantern", "jackolantern"),
        ("😀🎉", ""),
        ("#日本", ""),
        ("tag\x00with\x00nul", "tagwithnul"),
    ],
)
def test_key_rule(tag, key):
    assert hashtag_key(tag) == key


# --- rule 2 and 4: lemma match and sense choice ----------------------------------------------------------------


def random_surface(name: str, py_rng: random.Random) -> str:
    """How a person might type a lemma as a hashtag: any case, separators squashed or kept, a leading '#'."""
    separator = py_rng.choice(["", " ", "-", "_"])
    text = name.replace("_", separator)
    text = "".join(ch.upper() if py_rng.random() < 0.3 else ch for ch in text)
    return py_rng.choice(["", "#", "##"]) + text


@pytest.mark.parametrize("sense", ["concrete-first", "first"])
def test_random_lemmas_map_to_their_reference_sense(py_rng, lemmas_by_key, concrete_first, first, sense):
    canonicalizer = concrete_first if sense == "concrete-first" else first
    keys = py_rng.sample(sorted(k for k in lemmas_by_key if not k.isdigit()), 400)
    for key in keys:
        names = lemmas_by_key[key]
        tag = random_surface(py_rng.choice(names), py_rng)
        expected = reference_choice(reference_candidates(names), sense)
        assert canonicalizer.canonical(tag) == expected, (tag, names)


def test_keys_shared_by_several_lemmas_merge_their_senses(lemmas_by_key, first, concrete_first):
    shared = [k for k, names in lemmas_by_key.items() if len(names) > 1 and not k.isdigit()]
    assert len(shared) > 100
    for key in shared[:: max(1, len(shared) // 60)]:
        candidates = reference_candidates(lemmas_by_key[key])
        assert first.canonical(key) == reference_choice(candidates, "first"), key
        assert concrete_first.canonical(key) == reference_choice(candidates, "concrete-first"), key


def test_synonyms_share_one_class(concrete_first):
    bear = wnid(wn.synset("brown_bear.n.01"))
    assert concrete_first.canonical("#brownbear") == concrete_first.canonical("ursusarctos") == bear
    car = wnid(wn.synset("car.n.01"))
    assert {concrete_first.canonical(t) for t in ["car", "#automobile", "Auto", "motorcar", "cars"]} == {car}


def test_kitty_is_the_kitten_under_concrete_first_and_the_pool_under_first(concrete_first, first):
    assert concrete_first.canonical("#kitty") == wnid(wn.synset("kitten.n.01"))
    assert first.canonical("#kitty") == wnid(wn.synset("pool.n.07"))
    assert wn.synsets("kitty", "n")[0] == wn.synset("pool.n.07")  # the premise: WordNet's first sense


def test_sense_rule_is_validated():
    with pytest.raises(ValueError, match="sense"):
        Canonicalizer("most-frequent", table=wordnet.noun_table())


# --- rule 3: morphology ------------------------------------------------------------------------------------


def test_issue_examples_of_base_forms(concrete_first):
    assert concrete_first.canonical("cars") == wnid(wn.synset("car.n.01"))
    assert concrete_first.canonical("#Geese") == wnid(wn.synset("goose.n.01"))
    assert concrete_first.canonical("goldenretrievers") == wnid(wn.synset("golden_retriever.n.01"))
    assert concrete_first.canonical("PolarBears") == wnid(wn.synset("ice_bear.n.01"))


def plural(word: str) -> str:
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def test_plurals_follow_nltk_morphy(py_rng, lemmas_by_key, concrete_first):
    simple = sorted(k for k, names in lemmas_by_key.items() if names == [k] and k.isalpha() and len(k) > 2)
    checked = 0
    for word in py_rng.sample(simple, 600):
        form = plural(word)
        if form in lemmas_by_key:  # a lemma of its own: rule 2, not 3
            continue
        base = wn.morphy(form, "n")
        if base is None:
            continue  # noun.exc sends anabases, arses, fortes to a base that is no noun: morphy gives up there
        # Exception bases may be multiword (comics -> comic_strip): look them up by their key.
        expected = reference_choice(reference_candidates(lemmas_by_key[hashtag_key(base)]), "concrete-first")
        assert concrete_first.canonical(form) == expected, (form, base)
        checked += 1
    assert checked > 300


def test_plurals_with_several_possible_bases_take_morphy_s_first_rule(lemmas_by_key, concrete_first):
    """`crosses` could be crosse or cross, `serves` serve or serf: nltk's rule order decides (crosse, serve)."""
    simple = [k for k, names in lemmas_by_key.items() if names == [k] and k.isalpha()]
    rules = wn.MORPHOLOGICAL_SUBSTITUTIONS["n"]  # nltk's own rule list
    ambiguous = []
    for word in simple:
        form = word + "s"
        bases = {form[: -len(old)] + new for old, new in rules if form.endswith(old)} & lemmas_by_key.keys()
        if form not in lemmas_by_key and len(bases) > 1:
            ambiguous.append(form)
    assert len(ambiguous) > 50
    for form in ambiguous:
        base = wn.morphy(form, "n")
        expected = reference_choice(reference_candidates(lemmas_by_key[hashtag_key(base)]), "concrete-first")
        assert concrete_first.canonical(form) == expected, (form, base)


def test_irregular_plurals_from_the_exception_list(py_rng, lemmas_by_key, concrete_first):
    with wn.open("noun.exc") as f:
        rows = [line.split() for line in f.read().splitlines() if line.strip()]
    irregular = [form for form, *_ in rows if form.isalpha() and form not in lemmas_by_key]
    for form in py_rng.sample(irregular, min(300, len(irregular))):
        base = wn.morphy(form, "n")
        if base is None:
            continue  # WordNet lists it, but its base is no noun: rule 3's suffix step may still find one
        expected = reference_choice(reference_candidates(lemmas_by_key[hashtag_key(base)]), "concrete-first")
        assert concrete_first.canonical(form) == expected, (form, base)


def test_squashed_multiword_plurals(py_rng, lemmas_by_key, concrete_first):
    multiword = sorted(k for k, names in lemmas_by_key.items() if len(names) == 1 and "_" in names[0]
                       and k.isalpha() and not k.endswith(("s", "x", "z", "ch", "sh", "y")))
    for key in py_rng.sample(multiword, 300):
        form = key + "s"
        if form in lemmas_by_key:
            continue
        expected = reference_choice(reference_candidates(lemmas_by_key[key]), "concrete-first")
        assert concrete_first.canonical(form) == expected, form


# --- rule 5: no candidate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["#instagood", "photooftheday", "1234", "#2019", "😀", "", "###", "beautiful",
                                 "x" * 10_000, "#" + "ab" * 40])
def test_tags_naming_no_noun_give_none(concrete_first, tag):
    assert concrete_first.canonical(tag) is None


def test_digit_lemmas_exist_but_digits_only_tags_give_none(concrete_first):
    assert wn.synsets("1000", "n")  # WordNet has "1000" as a noun: rule 5 is what drops it
    assert concrete_first.canonical("1000") is None


def test_memo_stays_bounded_and_answers_stay_right(monkeypatch, py_rng, lemmas_by_key):
    monkeypatch.setattr(canonical, "MEMO_LIMIT", 16)
    canonicalizer = Canonicalizer("first", table=wordnet.noun_table())
    keys = py_rng.sample(sorted(k for k in lemmas_by_key if not k.isdigit()), 100)
    first_pass = [canonicalizer.canonical(k) for k in keys]
    assert len(canonicalizer._memo) <= 16
    assert [canonicalizer.canonical(k) for k in keys] == first_pass
    assert first_pass == [reference_choice(reference_candidates(lemmas_by_key[k]), "first") for k in keys]


# --- locating WordNet and caching the table --------------------------------------------------------------------


def real_wordnet_folder() -> Path:
    return Path(nltk.data.find("corpora/wordnet").path)


def test_explicit_wordnet_folder_is_used(monkeypatch):
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(real_wordnet_folder()))
    location = wordnet.find_wordnet()
    assert Path(location.pointer.path) == real_wordnet_folder().resolve()


def test_explicit_folder_without_wordnet_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(tmp_path))
    with pytest.raises(UserError, match="make wordnet"):
        wordnet.find_wordnet()


def test_folder_without_lexnames_points_at_the_shipped_copy(monkeypatch, tmp_path):
    for name in ("data.noun", "index.noun", "noun.exc"):
        (tmp_path / name).write_text("")
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(tmp_path))
    with pytest.raises(UserError, match="lexnames.*wordnet-lexnames"):
        wordnet.find_wordnet()


def test_no_wordnet_anywhere_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(wordnet.WORDNET_ENV, raising=False)
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(UserError, match=r"make wordnet.*apt-get install wordnet-base wordnet-sense-index"):
        wordnet.find_wordnet()


def test_nltk_data_folder_is_searched(monkeypatch):
    folder = real_wordnet_folder()
    monkeypatch.delenv(wordnet.WORDNET_ENV, raising=False)
    monkeypatch.setenv("NLTK_DATA", str(folder.parent.parent))
    monkeypatch.setattr(nltk.data, "path", [])
    assert Path(wordnet.find_wordnet().pointer.path) == folder


def test_table_cache_round_trips_and_ignores_a_corrupt_file(tmp_path):
    table = wordnet.noun_table()
    path = tmp_path / "t.json"
    wordnet._write_table(path, table)
    assert wordnet._read_table(path) == table
    path.write_text('{"offsets": [1, 2')
    assert wordnet._read_table(path) is None
    assert wordnet._read_table(tmp_path / "absent.json") is None


def test_table_cache_has_the_mode_a_plain_open_gives(tmp_path):
    wordnet._write_table(tmp_path / "t.json", wordnet.noun_table())
    (tmp_path / "plain").write_text("")
    mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == mode


def test_table_matches_wordnet(py_rng):
    table = wordnet.noun_table()
    assert table.wordnet_version == "3.0" and len(table.offsets) == 82115  # WordNet 3.0's noun synsets
    for s in py_rng.sample(range(len(table.offsets)), 200):
        synset = wn.synset_from_pos_and_offset("n", table.offsets[s])
        assert table.lexnames[s] == synset.lexname() and table.lemmas[s] == synset.lemma_names()
        assert table.wnid(s) == wnid(synset) and table.synset_of_wnid[wnid(synset)] == s


def test_cache_file_is_named_by_table_version_and_wordnet_fingerprint(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    location = wordnet.find_wordnet()
    path = wordnet._table_path(location)
    assert path.parent == tmp_path / "wordnet"
    assert f"v{wordnet.TABLE_VERSION}" in path.name and location.fingerprint() in path.name
