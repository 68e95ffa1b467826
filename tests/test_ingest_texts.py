"""Item texts at ingest: item columns and a texts table (SQL, CSV, folder); bad rows quarantined."""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from imgsearch.data.demo_texts import emoji_texts, norm_hexcode, unpack_texts
from imgsearch.data.ingest import IngestConfig, ingest
from imgsearch.errors import CatalogError, ConfigError
from tests.conftest import make_folder_catalog


def _sql_catalog(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    for name in ("a1.png", "a2.png", "b1.png"):
        (root / "img" / name).write_bytes(b"not decoded at ingest")
    db = root / "catalog.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE items (item_id TEXT, item_name TEXT, tags TEXT);
            CREATE TABLE images (image_id TEXT, item_id TEXT, uri TEXT);
            CREATE TABLE texts (item_id TEXT, lang TEXT, kind TEXT, text);
            INSERT INTO items VALUES ('a', 'Cat face', 'cat, pet ,animal'), ('b', 'Red car', NULL);
            INSERT INTO images VALUES ('a1', 'a', 'img/a1.png'), ('a2', 'a', 'img/a2.png'),
                                      ('b1', 'b', 'img/b1.png');
            INSERT INTO texts VALUES ('a', 'ru', 'label', 'морда кошки'), ('a', 'ru', 'tag', 'кошка'),
                                     ('b', 'ru', 'label', 'красная машина'),
                                     ('zzz', 'ru', 'label', 'нет такого'),
                                     ('b', 'ru', 'tag', '   '), ('b', 'ru', 'tag', 42),
                                     ('b', NULL, 'tag', 'машина');
            """
        )
    conn.close()
    return db


def test_sql_catalog_texts_from_columns_and_a_texts_table(tmp_path: Path) -> None:
    db = _sql_catalog(tmp_path)
    cfg = IngestConfig(
        url=f"sqlite:///{db}",
        texts_table="texts",
        text_columns={"item_name": "label", "tags": "tag"},
    )
    result = ingest(cfg)
    texts = result.texts
    assert texts is not None and list(texts.columns) == ["item_id", "lang", "kind", "text"]
    got = set(texts.itertuples(index=False, name=None))
    assert got == {
        ("a", "en", "label", "Cat face"),
        ("a", "en", "tag", "animal"),
        ("a", "en", "tag", "cat"),
        ("a", "en", "tag", "pet"),
        ("b", "en", "label", "Red car"),
        ("a", "ru", "label", "морда кошки"),
        ("a", "ru", "tag", "кошка"),
        ("b", "ru", "label", "красная машина"),
    }
    bad = result.rejected[result.rejected["stage"] == "ingest_texts"]
    assert sorted(bad["reason"]) == ["empty_text", "missing_value", "not_text", "unknown_item"]
    assert result.metrics["n_rejected_texts"] == 4
    assert result.metrics["n_texts_ru_label"] == 2


def test_texts_table_is_for_sql_and_a_missing_table_is_named(tmp_path: Path) -> None:
    db = _sql_catalog(tmp_path)
    with pytest.raises(CatalogError, match="texts table 'words' not found"):
        ingest(IngestConfig(url=f"sqlite:///{db}", texts_table="words"))
    with pytest.raises(CatalogError, match="lacks"):
        ingest(IngestConfig(url=f"sqlite:///{db}", text_columns={"description": "name"}))


def test_folder_catalog_with_a_texts_file(tmp_path: Path) -> None:
    root = make_folder_catalog(tmp_path / "cat", n_items=3, per_item=2)
    items = sorted(p.name for p in root.iterdir() if p.is_dir())
    pd.DataFrame(
        {"item_id": items, "lang": ["en", "ru", "en"], "kind": "label", "text": ["one", "два", "3"]}
    ).to_csv(root / "texts.csv", index=False)
    result = ingest(IngestConfig(source="folder", path=str(root), texts_path="texts.csv"))
    assert result.texts is not None
    assert sorted(result.texts["text"]) == ["3", "one", "два"]  # "3" read as text, not a number
    with pytest.raises(ConfigError, match="texts_table is for sql"):
        ingest(IngestConfig(source="folder", path=str(root), texts_table="texts"))


def test_emojibase_matching(tmp_path: Path) -> None:
    assert norm_hexcode("2764-fe0f") == "2764" == norm_hexcode("2764")
    entries = {
        "en": [
            {"hexcode": "1f431", "label": "cat face", "tags": ["cat", "face"]},
            {"hexcode": "2764", "label": "red heart", "tags": ["love"]},
            {
                "hexcode": "1F44B",
                "label": "waving hand",
                "skins": [{"hexcode": "1F44B-1F3FB", "label": "waving hand: light skin"}],
            },
            {"hexcode": "1F600", "label": "not in the catalog"},
        ]
    }
    rows, stats = emoji_texts(entries, ["1F431", "2764-FE0F", "1F44B", "1F3F3"])
    assert ("1F431", "en", "label", "cat face") in rows
    assert ("2764-FE0F", "en", "tag", "love") in rows
    assert not any("skin" in text for *_, text in rows)
    assert stats["text_match_rate_en"] == pytest.approx(3 / 4)
    tgz = tmp_path / "eb.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        data = json.dumps(entries["en"]).encode()
        info = tarfile.TarInfo("package/en/compact.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert unpack_texts(tgz, tmp_path, ["en"])["en"][0]["label"] == "cat face"
