"""Restricted words: a per-language policy of words and phrases that a query may not contain.

``policy = RestrictedPolicy.load("configs/restricted.yaml")``; ``policy.check(text)`` returns
the first :class:`Match` (policy word, language, offending text) or ``None``;
``policy.enforce(text)`` raises :class:`RestrictedQueryError` with the reason instead.

How a text is read (each step exists because of a known trick):

1. Unicode NFC, then per character NFKC (fullwidth ``ＣＨＩＬＤ``, ligatures, superscripts),
   case folding, ``ё`` -> ``е``; accents on Latin letters dropped (``chíld``); combining marks,
   zero-width and other format characters (U+200B, U+200D, soft hyphen, BOM) and apostrophes
   removed (``child's`` -> ``childs``, ``chi\u200bld`` -> ``child``). Offsets back into the
   original text are kept, so a match quotes what the user wrote.
2. Tokens are runs of letters and digits, and runs of ``@`` or ``$``; anything else separates them.
3. Every token is a *unit*, and so are these joins of adjacent tokens (up to 8 tokens, 24
   letters): tokens separated by punctuation only, without whitespace (``ch-ild``, ``chi.ld``,
   ``c.h.i.l.d``, ``k_i_d``); and tokens separated by whitespace when at most one of them is
   longer than 4 characters (``c h i l d``, ``chil dren``, ``ребе нок``). The length limit is what
   keeps two ordinary words from being glued into a restricted one.
4. Each unit also yields variants: leetspeak when it mixes letters and digits (``ch1ld``,
   ``k1ds``, ``b@by``; ``0 1 3 4 5 7 8 @ $`` to Latin, ``0 3 4 6`` to Cyrillic) when
   ``leet`` is on; Latin/Cyrillic look-alikes when a unit is written in letters that exist in
   both scripts (``сhild`` with a Cyrillic ``с``, ``ВОY``); letters repeated 3+ times squeezed
   (``chiiild``).
5. A unit matches a policy word when its Snowball stem (``snowballstemmer``; English and
   Russian here, any Snowball language by its name in the policy) *equals* the stem of a policy
   word of that language. Phrases match as consecutive token stems, or glued into one word.

Whole-word stem equality, never substrings, is what keeps innocent words out: ``kidney``
(stem ``kidney``), ``boycott``, ``детектив`` (``детект``) do not contain a match, and neither do
``childhood``, ``girlfriend`` and ``мальчишник`` (a bachelor party): they are other words
with their own stems; a policy that means them lists them. The cost is that a restricted word
hidden inside a longer one (``cutechild``) is not found: compounds must be listed. Snowball
does not know irregular forms, so a policy lists them as words of their own: ``children``,
``дети``/``детьми`` beside ``ребёнок``, and the fleeting-vowel forms ``ребёнка``,
``девочек``, ``младенца``. When a stem collides with an innocent word (``деть``, "to put",
stems like ``дети``), the language's ``allow`` list names the innocent word.

All languages of a policy are checked for every text (a Russian query holding ``kids`` is
refused too); ``lang`` only decides which language's match is reported first.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import snowballstemmer
import yaml

from imgsearch.errors import ConfigError, ImgsearchError

#: ISO 639-1 code -> Snowball algorithm, for policies that do not name one.
STEMMERS = {"en": "english", "ru": "russian", "de": "german", "fr": "french", "es": "spanish"}
MAX_JOIN = 8
MAX_JOIN_LETTERS = 24
SHORT = 4  # a token this long or shorter may be glued across whitespace

_APOSTROPHES = set("'\u2019\u2018\u02bc\u02b9`\u00b4\u2032")
_LEET_LATIN = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "@": "a",
    "$": "s",
}
_LEET_LATIN_L = {**_LEET_LATIN, "1": "l"}
_LEET_CYR = {"0": "о", "3": "з", "4": "ч", "6": "б", "@": "а"}
# Cyrillic -> Latin look-alikes (lower case, and lower-case forms of upper-case look-alikes).
_CYR_TO_LAT = dict(zip("асеорхукмтвнііјѕ", "aceopxykmtbhiijs", strict=True))
_LAT_TO_CYR = {lat: cyr for cyr, lat in _CYR_TO_LAT.items() if cyr not in "ії"}
_SQUEEZE = re.compile(r"(.)\1{2,}")


class RestrictedQueryError(ImgsearchError):
    """A query contains a restricted word. ``match`` says which word, language and text."""

    def __init__(self, match: Match) -> None:
        super().__init__(
            f"query refused: {match.token!r} is the restricted word {match.word!r} "
            f"({match.lang}) of policy {match.policy!r}"
        )
        self.match = match


@dataclass(frozen=True)
class Match:
    """``word``: the policy word or phrase as written in the policy; ``lang``: its language;
    ``token``: the offending part of the checked text as written there; ``span``: its
    ``(start, end)`` offsets in that text; ``policy``: the policy's name."""

    word: str
    lang: str
    token: str
    span: tuple[int, int]
    policy: str


# --- normalisation ------------------------------------------------------------------------------


def _fold_char(ch: str) -> str:
    if ch in _APOSTROPHES or unicodedata.category(ch) in ("Cf", "Mn", "Me", "Mc"):
        return ""
    out = unicodedata.normalize("NFKC", ch).casefold().replace("ё", "е")
    if out.isascii():
        return out
    folded = []
    for c in out:
        if unicodedata.name(c, "").startswith("LATIN"):  # chíld -> child; й, ё stay Cyrillic
            c = "".join(d for d in unicodedata.normalize("NFD", c) if not unicodedata.combining(d))
        folded.append(c)
    return "".join(folded)


def normalise(text: str) -> tuple[str, list[int]]:
    """The folded text, and for each of its characters the offset of its source character."""
    text = unicodedata.normalize("NFC", text)
    chars: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        for c in _fold_char(ch):
            chars.append(c)
            origin.append(i)
    return "".join(chars), origin


@dataclass(frozen=True)
class _Token:
    text: str
    start: int  # offsets in the folded text
    end: int
    space_before: bool  # whitespace in the gap before it (else punctuation only, or nothing)


def _tokens(folded: str) -> list[_Token]:
    out: list[_Token] = []
    prev_end = 0
    # "@" and "$" are tokens of their own: "b@by" is then glued back by _units (no space
    # between), while "kid@home" still has "kid" as a unit.
    for m in re.finditer(r"[^\W_]+|[@$]+", folded):
        gap = folded[prev_end : m.start()]
        out.append(_Token(m.group(), m.start(), m.end(), any(c.isspace() for c in gap)))
        prev_end = m.end()
    return out


def _units(tokens: Sequence[_Token]) -> Iterator[tuple[str, int, int]]:
    """(text, first token, last token + 1) of every token and every allowed join."""
    for i, tok in enumerate(tokens):
        yield tok.text, i, i + 1
        long_ones = int(len(tok.text) > SHORT)
        glued = tok.text
        spaced_ok = True
        punct_ok = True
        for j in range(i + 1, min(i + MAX_JOIN, len(tokens))):
            nxt = tokens[j]
            glued += nxt.text
            long_ones += int(len(nxt.text) > SHORT)
            punct_ok = punct_ok and not nxt.space_before
            spaced_ok = spaced_ok and long_ones <= 1
            if len(glued) > MAX_JOIN_LETTERS or not (punct_ok or spaced_ok):
                break
            yield glued, i, j + 1


def _variants(unit: str) -> set[str]:
    out = {unit}
    has_alpha = any(c.isalpha() for c in unit)
    if has_alpha and any(c.isdigit() or c in "@$" for c in unit):
        for table in (_LEET_LATIN, _LEET_LATIN_L, _LEET_CYR):
            out.add("".join(table.get(c, c) for c in unit))
    for v in list(out):
        letters = [c for c in v if c.isalpha()]
        if letters and all(c in _CYR_TO_LAT or c.isascii() for c in letters):
            out.add("".join(_CYR_TO_LAT.get(c, c) for c in v))
        if letters and all(c in _LAT_TO_CYR or not c.isascii() for c in letters):
            out.add("".join(_LAT_TO_CYR.get(c, c) for c in v))
    out |= {_SQUEEZE.sub(r"\1", v) for v in out}
    return out


# --- the policy ---------------------------------------------------------------------------------


@dataclass
class _Language:
    code: str
    stemmer: Any
    words: dict[str, str]  # stem of a one-word entry -> the entry as written
    phrases: dict[tuple[str, ...], str]  # stems of a phrase's words -> the phrase as written
    allow: set[str]  # folded words never matched

    def stem(self, word: str) -> str:
        return str(self.stemmer.stemWord(word))


class RestrictedPolicy:
    """Words and phrases per language; see the module doc for how texts are matched."""

    def __init__(
        self,
        languages: Mapping[str, Mapping[str, Any]],
        name: str = "restricted",
        leet: bool = True,
    ) -> None:
        self.name = name
        self.leet = leet
        self.languages: dict[str, _Language] = {}
        for code, spec in languages.items():
            self.languages[code] = self._language(code, spec or {})
        if not any(lang.words or lang.phrases for lang in self.languages.values()):
            raise ConfigError(f"restricted policy {name!r} names no words")

    @staticmethod
    def _language(code: str, spec: Mapping[str, Any]) -> _Language:
        unknown = sorted(set(spec) - {"words", "allow", "stemmer"})
        if unknown:
            raise ConfigError(f"restricted policy, language {code!r}: unknown keys {unknown}")
        algorithm = spec.get("stemmer") or STEMMERS.get(code)
        if algorithm not in snowballstemmer.algorithms():
            raise ConfigError(
                f"restricted policy, language {code!r}: no Snowball stemmer {algorithm!r}; "
                f"set 'stemmer' to one of {snowballstemmer.algorithms()}"
            )
        lang = _Language(code, snowballstemmer.stemmer(algorithm), {}, {}, set())
        for entry in spec.get("words") or []:
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(f"restricted policy, language {code!r}: bad entry {entry!r}")
            parts = [t.text for t in _tokens(normalise(entry)[0])]
            stems = tuple(lang.stem(p) for p in parts)
            if len(stems) == 1:
                lang.words[stems[0]] = entry
            else:
                lang.phrases[stems] = entry
                lang.words.setdefault(lang.stem("".join(parts)), entry)  # "schoolgirl"
        lang.allow = {normalise(str(w))[0] for w in spec.get("allow") or []}
        return lang

    @classmethod
    def load(cls, path: str | Path) -> RestrictedPolicy:
        """Read a policy YAML (see ``configs/restricted.yaml``); :class:`ConfigError` if malformed."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read restricted policy {path}: {exc}") from exc
        if not isinstance(data, Mapping) or not isinstance(data.get("languages"), Mapping):
            raise ConfigError(f"{path}: a restricted policy needs a 'languages' mapping")
        unknown = sorted(set(data) - {"name", "leet", "languages"})
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}")
        return cls(
            data["languages"], str(data.get("name", path.stem)), bool(data.get("leet", True))
        )

    def terms(self, lang: str | None = None) -> list[str]:
        """The policy's words and phrases as written (one language, or all), sorted: the texts a
        zero-shot image check embeds (:mod:`imgsearch.search.restricted_images`)."""
        chosen = [self.languages[lang]] if lang in self.languages else self.languages.values()
        return sorted(
            {
                w
                for language in chosen
                for w in (*language.words.values(), *language.phrases.values())
            }
        )

    def _order(self, lang: str | None) -> list[_Language]:
        first = [self.languages[lang]] if lang in self.languages else []
        return first + [v for k, v in self.languages.items() if k != lang]

    def check(self, text: str, lang: str | None = None) -> Match | None:
        """The first restricted word in ``text`` (in reading order), or ``None``."""
        if not isinstance(text, str):
            raise ConfigError(f"restricted check: expected a str, got {type(text).__name__}")
        folded, origin = normalise(text)
        tokens = _tokens(folded)
        languages = self._order(lang)
        for unit, i, j in _units(tokens):
            for language in languages:
                word = self._match_unit(unit, language)
                if word is not None:
                    return self._match(text, origin, tokens, i, j, word, language.code)
        for language in languages:
            found = self._match_phrase(tokens, language)
            if found is not None:
                word, i, j = found
                return self._match(text, origin, tokens, i, j, word, language.code)
        return None

    def _match_unit(self, unit: str, language: _Language) -> str | None:
        if unit in language.allow:
            return None
        variants = _variants(unit) if self.leet else {unit}
        for v in variants:
            if v not in language.allow and (found := language.words.get(language.stem(v))):
                return found
        return None

    @staticmethod
    def _match_phrase(tokens: Sequence[_Token], language: _Language) -> tuple[str, int, int] | None:
        stems = [language.stem(t.text) for t in tokens]
        for phrase, word in language.phrases.items():
            n = len(phrase)
            for i in range(len(stems) - n + 1):
                if tuple(stems[i : i + n]) == phrase:
                    return word, i, i + n
        return None

    def _match(
        self,
        text: str,
        origin: list[int],
        tokens: Sequence[_Token],
        i: int,
        j: int,
        word: str,
        lang: str,
    ) -> Match:
        start, end = origin[tokens[i].start], origin[tokens[j - 1].end - 1] + 1
        return Match(word, lang, text[start:end], (start, end), self.name)

    def enforce(self, text: str, lang: str | None = None) -> None:
        """:class:`RestrictedQueryError` when ``text`` holds a restricted word."""
        match = self.check(text, lang)
        if match is not None:
            raise RestrictedQueryError(match)

    def scan(self, texts: Sequence[str], lang: str | None = None) -> list[Match | None]:
        """:meth:`check` of each text (for excluding catalog items and listing why)."""
        return [self.check(t, lang) for t in texts]

    def words(self) -> dict[str, list[str]]:
        """The policy's entries per language, as written."""
        return {
            code: sorted(set(itertools.chain(lang.words.values(), lang.phrases.values())))
            for code, lang in self.languages.items()
        }
