"""The restricted-words policy: tricky spellings in both languages match, innocent words do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.search.restricted import RestrictedPolicy, RestrictedQueryError

POLICY_FILE = Path(__file__).resolve().parents[1] / "configs" / "restricted.yaml"

# (text, the policy word that must be reported)
MUST_MATCH_EN = [
    ("child", "child"),
    ("CHILDREN", "children"),
    ("child's toys", "child"),
    ("Kids", "kid"),
    ("a Baby", "baby"),
    ("Babies", "baby"),
    ("BOYS", "boy"),
    ("girl\u2019s dress", "girl"),  # curly apostrophe
    ("c h i l d", "child"),
    ("ch-ild", "child"),
    ("chi.ld", "child"),
    ("c.h.i.l.d", "child"),
    ("k_i_d", "kid"),
    ("chil dren", "children"),
    ("ch1ld", "child"),  # leetspeak
    ("k1ds", "kid"),
    ("b@by", "baby"),
    ("l1ttle b0y", "boy"),
    ("b\u0430by", "baby"),  # Cyrillic а inside a Latin word
    ("\u0441hild", "child"),  # Cyrillic с
    ("\u0412\u041eY", "boy"),  # Cyrillic В and О
    ("\uff23\uff28\uff29\uff2c\uff24", "child"),  # fullwidth
    ("chi\u200bld", "child"),  # zero-width space
    ("c\u00adhild", "child"),  # soft hyphen
    ("ki\u200dd", "kid"),  # zero-width joiner
    ("ch\u00edld", "child"),  # accent
    ("c\u0332h\u0332i\u0332l\u0332d\u0332", "child"),  # combining underline
    ("kiiids", "kid"),  # repeated letters
    ("kid@home", "kid"),
    ("a photo of a schoolgirl", "school girl"),  # a phrase, glued
    ("school girls", "girl"),
    ("Toddler shoes", "toddler"),
]
MUST_MATCH_RU = [
    ("дети", "дети"),
    ("детей", "дети"),
    ("ДЕТИ", "дети"),
    ("детьми", "детьми"),
    ("Ребёнок", "ребёнок"),
    ("ребенок", "ребёнок"),
    ("РЕБЁНКА", "ребёнка"),
    ("ребенку", "ребёнка"),
    ("малыш", "малыш"),
    ("малыши", "малыш"),
    ("малышка", "малышка"),
    ("мальчики", "мальчик"),
    ("мальчик!", "мальчик"),
    ("девочки", "девочка"),
    ("девочек", "девочек"),
    ("младенец", "младенец"),
    ("младенцы", "младенца"),
    ("д е т и", "дети"),
    ("де-ти", "дети"),
    ("м а л ы ш", "малыш"),
    ("р.е.б.е.н.о.к", "ребёнок"),
    ("ребе нок", "ребёнок"),
    ("д\u0065ти", "дети"),  # Latin e inside a Cyrillic word
    ("ма\u200bлыш", "малыш"),
    ("чили с детьми", "детьми"),
    ("ребе\u0308нок", "ребёнок"),  # ё written as е + combining diaeresis
    ("д3вочка", "девочка"),  # Latin leet reads 3 as e, then the look-alike е
]

INNOCENT = [
    "kidney",
    "kidney beans",
    "boycott",
    "детектив",
    "childhood",  # another word with its own stem: lists name it if they mean it
    "girlfriend",
    "boyfriend",
    "мальчишник",  # a bachelor party
    "skid row",
    "kidnapped",
    "no kidding",  # "to kid" (joke): allow-listed
    "детали",
    "детство",
    "куда деть ключи",  # "where to put the keys": allow-listed, stems like дети
    "Малышев",  # a surname: allow-listed
    "a cat",
    "cat face",
    "красная машина",
    "морда кошки",
    "birthday card",
    "Boyle",
    "chill",
    "ребро",
    "дедушка",
    "bay",
    "a big red bus in the city",
    "go to the sea by bus",
    "flag: United Kingdom",
    "я иду в кино",
    "он и она",
]


@pytest.fixture(scope="module")
def policy() -> RestrictedPolicy:
    return RestrictedPolicy.load(POLICY_FILE)


@pytest.mark.parametrize(("text", "word"), MUST_MATCH_EN)
def test_english_tricks_match(policy: RestrictedPolicy, text: str, word: str) -> None:
    match = policy.check(text)
    assert match is not None, text
    assert (match.word, match.lang) == (word, "en")


@pytest.mark.parametrize(("text", "word"), MUST_MATCH_RU)
def test_russian_tricks_match(policy: RestrictedPolicy, text: str, word: str) -> None:
    match = policy.check(text)
    assert match is not None, text
    assert (match.word, match.lang) == (word, "ru")


@pytest.mark.parametrize("text", INNOCENT)
def test_innocent_words_do_not_match(policy: RestrictedPolicy, text: str) -> None:
    assert policy.check(text) is None


def test_match_quotes_the_original_text(policy: RestrictedPolicy) -> None:
    text = "photos of ＣＨ-ＩＬＤ on a beach"
    match = policy.check(text)
    assert match is not None
    assert match.token == "ＣＨ-ＩＬＤ"
    assert text[match.span[0] : match.span[1]] == match.token
    assert match.policy == "children"


def test_every_language_is_checked_whatever_lang_says(policy: RestrictedPolicy) -> None:
    match = policy.check("фото kids", lang="ru")
    assert match is not None and match.lang == "en"
    assert policy.check("красный автобус", lang="en") is None
    assert policy.check("cat", lang="de") is None  # a language the policy lacks: still checked


def test_enforce_raises_a_clear_error(policy: RestrictedPolicy) -> None:
    with pytest.raises(RestrictedQueryError, match=r"restricted word 'ребёнок' \(ru\)") as info:
        policy.enforce("Ребёнок с мячом")
    assert isinstance(info.value, ImgsearchError)
    assert info.value.match.token == "Ребёнок"
    policy.enforce("a red ball")  # no error


def test_scan_lists_matches(policy: RestrictedPolicy) -> None:
    found = policy.scan(["cat", "baby angel", "девочка"])
    assert found[0] is None
    assert [m.word for m in found[1:] if m] == ["baby", "девочка"]


def test_leet_can_be_switched_off() -> None:
    policy = RestrictedPolicy({"en": {"words": ["child"]}}, leet=False)
    assert policy.check("ch1ld") is None
    assert policy.check("child") is not None


def test_bad_policies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no words"):
        RestrictedPolicy({"en": {"words": []}})
    with pytest.raises(ConfigError, match="Snowball"):
        RestrictedPolicy({"xx": {"words": ["a"]}})
    with pytest.raises(ConfigError, match="unknown keys"):
        RestrictedPolicy({"en": {"words": ["a"], "forms": []}})
    bad = tmp_path / "p.yaml"
    bad.write_text("words: [child]\n")
    with pytest.raises(ConfigError, match="languages"):
        RestrictedPolicy.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        RestrictedPolicy.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="str"):
        RestrictedPolicy({"en": {"words": ["a"]}}).check(None)  # type: ignore[arg-type]
