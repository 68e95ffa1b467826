"""Demo catalog: written from fake emoji-datasource packages made here (no network, no npm)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from imgsearch import schema as S
from imgsearch.config import from_dict, load_config
from imgsearch.data import demo as demo_data
from imgsearch.data.demo import (
    DemoConfig,
    FetchError,
    fetch_emoji,
    select_emoji,
    unpack,
    write_catalog,
)
from imgsearch.data.ingest import IngestConfig, ingest
from imgsearch.errors import CatalogError, ConfigError

CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Flags")


def fake_emoji(n: int = 6) -> list[dict[str, object]]:
    """``n`` emoji over three categories; the last one has no Twitter drawing, one has skin tones."""
    out: list[dict[str, object]] = []
    for i in range(n):
        unified = f"1F6{i:02X}"
        out.append(
            {
                "name": f"FACE {i}",
                "short_name": f"face_{i}",
                "unified": unified,
                "image": f"{unified.lower()}.png",
                "category": CATEGORIES[i * len(CATEGORIES) // n],
                "subcategory": f"sub-{i % 2}",
                "sort_order": 10 * (n - i),  # reverse of the file order: the catalog must sort
                "has_img_google": True,
                "has_img_twitter": i != n - 1,
                **(
                    {"skin_variations": {"1F3FB": {"unified": f"{unified}-1F3FB"}}}
                    if i == 0
                    else {}
                ),
            }
        )
    return out


def make_package(root: Path, vendor: str, emoji: list[dict[str, object]]) -> Path:
    """``root/package`` laid out like the npm package: emoji.json + img/<vendor>/64/*.png."""
    package = root / "package"
    image_dir = package / "img" / vendor / "64"
    image_dir.mkdir(parents=True)
    (package / "emoji.json").write_text(json.dumps(emoji))
    for i, entry in enumerate(emoji):
        if entry[f"has_img_{vendor}"]:
            Image.new("RGBA", (8, 8), (i * 40 % 256, 0, 200, 255)).save(
                image_dir / str(entry["image"])
            )
    (package / "img" / vendor / "sheets").mkdir()
    (package / "img" / vendor / "sheets" / "big.png").write_bytes(b"not unpacked")
    return package


def make_tgz(tmp_path: Path, vendor: str, emoji: list[dict[str, object]]) -> Path:
    src = tmp_path / f"src-{vendor}"
    package = make_package(src, vendor, emoji)
    tgz = tmp_path / f"emoji-datasource-{vendor}-16.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(package, arcname="package")
    return tgz


def place_in_cache(tgz: Path, cache_dir: Path) -> None:
    (cache_dir / "npm").mkdir(parents=True, exist_ok=True)
    (cache_dir / "npm" / tgz.name).write_bytes(tgz.read_bytes())


@pytest.fixture
def no_npm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: None)


def read_db(db: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with sqlite3.connect(db) as conn:
        items = pd.read_sql("SELECT * FROM items", conn)
        images = pd.read_sql("SELECT * FROM images", conn)
    return items, images


def test_write_catalog(tmp_path: Path) -> None:
    emoji = fake_emoji(6)
    packages = {v: make_package(tmp_path / v, v, emoji) for v in ("google", "twitter")}
    db = tmp_path / "catalog.sqlite"
    counts = write_catalog(packages, tmp_path, db)
    items, images = read_db(db)
    assert counts == {"n_items": 6, "n_images": 11, "n_texts": 0}
    assert len(items) == 6 and len(images) == 11  # the last emoji has no Twitter drawing
    assert set(images["vendor"]) == {"google", "twitter"}
    assert "twitter/1F605" not in set(images["image_id"]) and "google/1F605" in set(
        images["image_id"]
    )
    assert images.loc[images["image_id"] == "google/1F600", "uri"].item() == (
        "google/package/img/google/64/1f600.png"
    )
    assert not any("1F3FB" in i for i in images["image_id"])  # base emoji only
    assert {"downloads", "likes", "nsfw"}.isdisjoint(items.columns)  # nothing invented
    for uri in images["uri"]:
        assert (tmp_path / uri).is_file()


def test_catalog_ingests_without_mapping(tmp_path: Path) -> None:
    emoji = fake_emoji(4)
    packages = {"google": make_package(tmp_path / "google", "google", emoji)}
    db = tmp_path / "catalog.sqlite"
    write_catalog(packages, tmp_path, db)
    result = ingest(IngestConfig(source="sql", url=f"sqlite:///{db}"))
    manifest = result.manifest
    assert result.metrics["n_images"] == 4 and result.metrics["n_rejected"] == 0
    assert manifest[S.DOWNLOADS].isna().all() and manifest[S.LIKES].isna().all()
    assert manifest[S.CATEGORY].notna().all() and manifest["vendor"].eq("google").all()
    assert all(Path(p).is_file() for p in manifest[S.PATH])


def test_select_emoji_spreads_over_sort_order() -> None:
    entries = [{"unified": f"{i:04X}", "sort_order": i} for i in range(100)]
    assert [e["sort_order"] for e in select_emoji(entries, 4)] == [0, 25, 50, 75]
    assert [e["sort_order"] for e in select_emoji(entries, 3)] == [0, 33, 66]
    assert len(select_emoji(entries, None)) == 100 and len(select_emoji(entries, 500)) == 100
    shuffled = entries[::-1]
    assert select_emoji(shuffled, 7) == select_emoji(entries, 7)  # deterministic


def test_limit_spreads_over_categories(tmp_path: Path) -> None:
    emoji = fake_emoji(9)
    db = tmp_path / "c.sqlite"
    write_catalog({"google": make_package(tmp_path / "g", "google", emoji)}, tmp_path, db, limit=3)
    items, _ = read_db(db)
    assert len(items) == 3 and set(items["category"]) == set(CATEGORIES)


def test_fetch_uses_cached_tarball_without_npm(tmp_path: Path, no_npm: None) -> None:
    emoji = fake_emoji(5)
    cache = tmp_path / "cache"
    for vendor in ("google", "twitter"):
        place_in_cache(make_tgz(tmp_path, vendor, emoji), cache)
    db = fetch_emoji(cache, ("google", "twitter"), limit=None)
    assert db.parent == cache.resolve() and db.name == "emoji-google-twitter-all.sqlite"
    items, images = read_db(db)
    assert len(items) == 5 and len(images) == 9
    assert not (cache / "google" / "package" / "img" / "google" / "sheets").exists()  # 64 px only
    assert (cache / "google" / "package" / "img" / "google" / "64" / "1f600.png").is_file()

    # unpacked once: a second call does not open the tarballs again
    (cache / "npm" / "emoji-datasource-google-16.0.0.tgz").write_bytes(b"corrupt")
    db2 = fetch_emoji(cache, ("google",), limit=2)
    assert len(read_db(db2)[0]) == 2


def test_missing_npm_says_what_to_do(tmp_path: Path, no_npm: None) -> None:
    with pytest.raises(FetchError, match="npm") as info:
        fetch_emoji(tmp_path / "cache", ("google",))
    assert "apt-get install nodejs npm" in str(info.value) and "own catalog" in str(info.value)


def fake_npm(tmp_path: Path, body: str) -> str:
    script = tmp_path / "npm"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_npm_pack_is_called_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tgz = make_tgz(tmp_path, "google", fake_emoji(3))
    log = tmp_path / "calls.txt"
    npm = fake_npm(tmp_path, f'echo "$@" >> {log}\ncp {tgz} ./emoji-datasource-google-16.0.0.tgz')
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: npm)
    cache = tmp_path / "cache"
    fetch_emoji(cache, ("google",))
    fetch_emoji(cache, ("google",))
    assert log.read_text().splitlines() == ["pack emoji-datasource-google@16.0.0 --silent"]
    assert [p.name for p in (cache / "npm").iterdir()] == ["emoji-datasource-google-16.0.0.tgz"]


def test_npm_failure_leaves_no_cached_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npm = fake_npm(
        tmp_path,
        'echo partial > ./emoji-datasource-google-16.0.0.tgz\necho "E404 offline" >&2\nexit 1',
    )
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: npm)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="E404 offline"):
        fetch_emoji(cache, ("google",))
    assert list((cache / "npm").iterdir()) == []


def _tgz_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("package/emoji.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"[]"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return tgz


def test_unpack_refuses_escaping_members(tmp_path: Path) -> None:
    escape = tarfile.TarInfo("package/img/google/64/../../../../../escaped.png")
    tgz = _tgz_with(tmp_path, escape, b"x")
    with pytest.raises(FetchError, match="cannot unpack"):
        unpack(tgz, tmp_path / "out" / "google", "google")
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "out" / "google").exists()

    link = tarfile.TarInfo("package/img/google/64/link.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(FetchError, match="cannot unpack"):
        unpack(_tgz_with(tmp_path, link), tmp_path / "out2" / "google", "google")


def test_unpack_refuses_a_tarball_that_is_not_the_package(tmp_path: Path) -> None:
    tgz = tmp_path / "other.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("package/readme.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(FetchError, match="emoji.json"):
        unpack(tgz, tmp_path / "out" / "google", "google")


def test_bad_emoji_json(tmp_path: Path) -> None:
    package = make_package(tmp_path / "g", "google", fake_emoji(2))
    (package / "emoji.json").write_text(json.dumps([{"unified": "1F600"}]))
    with pytest.raises(CatalogError, match="lacks"):
        write_catalog({"google": package}, tmp_path, tmp_path / "c.sqlite")


def test_demo_config(tmp_path: Path) -> None:
    cfg = from_dict(DemoConfig, load_config()["demo"])
    assert cfg.vendors == ["google", "twitter", "facebook", "apple"] and cfg.limit is None
    assert from_dict(DemoConfig, load_config("ci")["demo"]).limit == 40
    with pytest.raises(ConfigError, match="unknown"):
        DemoConfig(vendors=["google", "samsung"])
    with pytest.raises(ConfigError, match="positive"):
        DemoConfig(limit=0)


def test_fetch_demo_step_uses_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_npm: None
) -> None:
    from steps import fetch_demo

    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMGSEARCH_PROFILE", raising=False)
    cache = tmp_path / "home" / "data" / "emoji"
    for vendor in demo_data.VENDORS:
        emoji = fake_emoji(4)
        for entry in emoji:
            entry[f"has_img_{vendor}"] = True
        place_in_cache(make_tgz(tmp_path, vendor, emoji), cache)
    _place_emojibase(
        cache / "npm", [{"hexcode": emoji[-1]["unified"], "label": "first", "tags": ["x"]}]
    )
    path = Path(fetch_demo.run(limit=2))
    assert path == cache.resolve() / "emoji-google-twitter-facebook-apple-2.sqlite"
    items, images = read_db(path)
    assert len(items) == 2 and len(images) == 8
    assert os.path.commonpath([path, tmp_path / "home"]) == str(tmp_path / "home")
    with sqlite3.connect(path) as conn:  # the emojibase labels and tags, both languages
        texts = conn.execute("SELECT lang, kind, text FROM texts ORDER BY 1, 2").fetchall()
    conn.close()
    assert texts == [
        ("en", "label", "first"),
        ("en", "tag", "x"),
        ("ru", "label", "first"),
        ("ru", "tag", "x"),
    ]


def _place_emojibase(npm_dir: Path, entries: list[dict[str, object]]) -> None:
    """A fake emojibase-data tarball in the npm cache (en and ru with the same entries)."""
    npm_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(entries).encode()
    with tarfile.open(npm_dir / "emojibase-data-17.0.0.tgz", "w:gz") as tar:
        for lang in ("en", "ru"):
            info = tarfile.TarInfo(f"package/{lang}/compact.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
