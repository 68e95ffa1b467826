"""Demo item texts: emoji labels and tags in several languages from ``emojibase-data`` (MIT).

``npm pack emojibase-data@17.0.0`` (fetched at run time like the drawings, never committed);
``<lang>/compact.json`` lists ``{hexcode, label, tags, ...}``. An entry matches a demo item when
their code points agree after upper-casing and dropping the variation selector ``FE0F``
(emojibase writes ``2764``, the drawings ``2764-FE0F``). Skin-tone variants are nested under
``skins`` in emojibase and are not items here. Each matched item gets one ``label`` row and one
``tag`` row per tag, per language; the match rate is returned and logged.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imgsearch.errors import CatalogError, FetchError

log = logging.getLogger(__name__)

TEXT_PACKAGE = "emojibase-data"
TEXT_VERSION = "17.0.0"
TEXT_LANGS = ("en", "ru")


def norm_hexcode(code: str) -> str:
    """``"2764-fe0f"`` -> ``"2764"``: upper case, without the variation selector FE0F."""
    return "-".join(p for p in str(code).upper().split("-") if p and p != "FE0F")


def unpack_texts(tgz: Path, dest: Path, langs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``lang -> compact.json entries`` read straight from the tarball (nothing else unpacked)."""
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for lang in langs:
                member = tar.extractfile(f"package/{lang}/compact.json")
                if member is None:
                    raise FetchError(f"{tgz.name} has no {lang}/compact.json")
                data = json.loads(member.read().decode("utf-8"))
                if not isinstance(data, list):
                    raise CatalogError(f"{tgz.name}: {lang}/compact.json is not a list")
                out[lang] = [e for e in data if isinstance(e, dict)]
    except KeyError as exc:
        raise FetchError(f"{tgz.name}: language not in the package ({exc})") from exc
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise FetchError(f"cannot read {tgz} ({exc}); delete it to download it again") from exc
    return out


def emoji_texts(
    entries: Mapping[str, Iterable[Mapping[str, Any]]], item_ids: Iterable[str]
) -> tuple[list[tuple[str, str, str, str]], dict[str, float]]:
    """Rows ``(item_id, lang, kind, text)`` for the demo items, and the match rate per language."""
    by_code = {norm_hexcode(i): str(i) for i in item_ids}
    rows: list[tuple[str, str, str, str]] = []
    stats: dict[str, float] = {}
    for lang, lang_entries in entries.items():
        matched: set[str] = set()
        for entry in lang_entries:
            item = by_code.get(norm_hexcode(str(entry.get("hexcode", ""))))
            label = entry.get("label")
            if item is None or not isinstance(label, str) or not label.strip():
                continue
            matched.add(item)
            rows.append((item, lang, "label", label.strip()))
            tags = entry.get("tags") or []
            rows += [
                (item, lang, "tag", t.strip()) for t in tags if isinstance(t, str) and t.strip()
            ]
        stats[f"text_match_rate_{lang}"] = len(matched) / len(by_code) if by_code else 0.0
        log.info("emojibase %s: texts for %d of %d demo emoji", lang, len(matched), len(by_code))
    return sorted(set(rows)), stats
