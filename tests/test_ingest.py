"""Ingest: three catalog kinds, one manifest; bad catalogs raise, bad rows are rejected with a reason."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsearch import schema as S
from imgsearch.config import from_dict, load_config
from imgsearch.data.ingest import IngestConfig, ingest, ingest_folder, ingest_sql, ingest_table
from imgsearch.errors import CatalogError, ConfigError
from imgsearch.paths import resolve_within, str_to_path

INJECTION = "' OR 1=1; --"

# one small collection: item id -> (name, type, downloads, likes, nsfw, image files)
ITEMS = {
    101: ("cat", "LORA", 10, 1, 0, ["a.png", "b.png"]),
    102: ("dog", "Checkpoint", 2000, 30, 1, ["a.png", "sub/c.png"]),
    103: ("owl", "LORA", 0, 0, 0, ["x.jpg"]),
}
SHARED = [S.IMAGE_ID, S.ITEM_ID, S.URI, S.PATH]
ATTRS = [S.ITEM_NAME, S.CATEGORY, S.DOWNLOADS, S.LIKES, S.NSFW]


def image_rows() -> list[tuple[str, int, str]]:
    return [
        (f"{item}/{f}", item, f"{item}/{f}") for item, (*_, files) in ITEMS.items() for f in files
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The data root: one folder per item, small Pillow images, plus a file outside the root."""
    data = tmp_path / "data"
    for n, (_, uri, *_) in enumerate([(i, u) for i, _, u in image_rows()]):
        (data / uri).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (n * 30, 0, 0)).save(data / uri, format="PNG")
    (tmp_path / "outside.png").write_bytes(b"secret")
    return data


def write_sqlite(db: Path, images: list[tuple[object, object, object]] | None = None) -> str:
    """The first real user's shape: items(id, name, type, downloads, likes, nsfw), images(id, model_id, path)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, type TEXT, downloads INTEGER,"
            " likes INTEGER, nsfw BOOLEAN)"
        )
        conn.execute("CREATE TABLE images (id TEXT, model_id INTEGER, path TEXT)")
        conn.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
            [(i, *attrs[:5]) for i, attrs in ITEMS.items()],
        )
        conn.executemany(
            "INSERT INTO images VALUES (?, ?, ?)", image_rows() if images is None else images
        )
    conn.close()
    return f"sqlite:///{db}"


USER_MAPPING = {
    "item_columns": {"item_id": "id", "item_name": "name", "category": "type"},
    "image_columns": {"image_id": "id", "item_id": "model_id", "uri": "path"},
}


def sql_cfg(url: str, root: Path, **kw: object) -> IngestConfig:
    return IngestConfig(source="sql", url=url, data_root=str(root), **{**USER_MAPPING, **kw})  # type: ignore[arg-type]


def table_frame() -> pd.DataFrame:
    rows = []
    for image_id, item, uri in image_rows():
        name, kind, downloads, likes, nsfw, _ = ITEMS[item]
        rows.append((image_id, str(item), uri, name, kind, downloads, likes, bool(nsfw)))
    return pd.DataFrame(rows, columns=[S.IMAGE_ID, S.ITEM_ID, S.URI, *ATTRS])


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the same collection through every source -------------------------------------------------


def test_four_sources_give_the_same_manifest(root: Path, tmp_path: Path) -> None:
    url = write_sqlite(tmp_path / "catalog.db")
    frame = table_frame()
    frame.to_csv(tmp_path / "catalog.csv", index=False)
    frame.to_parquet(tmp_path / "catalog.parquet", index=False)

    results = {
        "sql": ingest(sql_cfg(url, root)),
        "csv": ingest(
            IngestConfig(source="table", path=str(tmp_path / "catalog.csv"), data_root=str(root))
        ),
        "parquet": ingest_table(tmp_path / "catalog.parquet", IngestConfig(data_root=str(root))),
        "folder": ingest(IngestConfig(source="folder", path=str(root))),
    }
    manifests = {
        k: r.manifest.sort_values(S.IMAGE_ID).reset_index(drop=True) for k, r in results.items()
    }
    reference = manifests["sql"]
    assert len(reference) == 5
    assert reference[S.IMAGE_ID].tolist() == sorted(uri for uri, _, _ in image_rows())
    assert reference[S.ITEM_ID].tolist() == ["101", "101", "102", "102", "103"]  # ints become text
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in reference[S.PATH])
    for name, manifest in manifests.items():
        pd.testing.assert_frame_equal(manifest[SHARED], reference[SHARED], obj=name)
        assert list(manifest.columns[: len(SHARED)]) == SHARED
        assert set(S.ITEM_ATTRIBUTES) <= set(manifest.columns)
        assert results[name].metrics == pytest.approx(
            {
                "n_items": 3,
                "n_images": 5,
                "n_rejected": 0,
                **({"n_orphan_images": 0} if name == "sql" else {}),
            }
        )
        assert len(results[name].rejected) == 0
    for name in ("csv", "parquet"):
        pd.testing.assert_frame_equal(
            manifests[name][ATTRS].astype(str), reference[ATTRS].astype(str), obj=name
        )
    # the folder has no attributes: empty, never invented
    assert manifests["folder"][ATTRS].isna().all().all()
    assert reference[[S.TAGS, S.CREATED_AT]].isna().all().all()
    # the manifest is a valid Parquet artifact
    reference.to_parquet(tmp_path / "manifest.parquet")


# --- SQL ----------------------------------------------------------------------------------------


def test_sql_filters_are_bound(root: Path, tmp_path: Path) -> None:
    url = write_sqlite(tmp_path / "catalog.db")
    only_lora = ingest(sql_cfg(url, root, filters={"category": "LORA"})).manifest
    assert sorted(only_lora[S.ITEM_ID].unique()) == ["101", "103"]
    listed = ingest(sql_cfg(url, root, filters={"item_id": [102, 103], "nsfw": 0})).manifest
    assert listed[S.ITEM_ID].tolist() == ["103"]
    by_text_id = ingest(sql_cfg(url, root, filters={"item_id": "102"})).manifest
    assert len(by_text_id) == 2
    for filters in (
        {"category": INJECTION},
        {"category": [INJECTION, f"LORA{INJECTION}"]},
        {"item_name": f"cat{INJECTION}"},
        {"item_id": INJECTION},
        {"image_id": "101/a.png' OR '1'='1"},
    ):
        result = ingest(sql_cfg(url, root, filters=filters))
        assert len(result.manifest) == 0, filters
    # and the catalog is intact afterwards
    assert len(ingest(sql_cfg(url, root)).manifest) == 5


def test_sql_names_are_checked_against_the_schema(root: Path, tmp_path: Path) -> None:
    url = write_sqlite(tmp_path / "catalog.db")
    with pytest.raises(CatalogError, match="not found"):
        ingest(sql_cfg(url, root, items_table="items; DROP TABLE images; --"))
    with pytest.raises(CatalogError, match="mapped columns not found"):
        ingest(
            sql_cfg(
                url,
                root,
                image_columns={"image_id": "id", "item_id": "model_id", "uri": "path; --"},
            )
        )
    with pytest.raises(ConfigError, match="unknown column"):
        ingest(sql_cfg(url, root, filters={"1=1; --": 1}))
    assert len(ingest(sql_cfg(url, root)).manifest) == 5  # nothing was dropped


def test_sql_missing_mapping_names_the_column(root: Path, tmp_path: Path) -> None:
    url = write_sqlite(tmp_path / "catalog.db")
    with pytest.raises(
        CatalogError, match=r"missing required columns \['image_id', 'item_id', 'uri'\]"
    ):
        ingest(
            IngestConfig(source="sql", url=url, data_root=str(root), item_columns={"item_id": "id"})
        )
    with pytest.raises(
        CatalogError, match=r"items table 'items': missing required columns \['item_id'\]"
    ):
        ingest(sql_cfg(url, root, item_columns={}))


def test_sql_duplicate_ids_and_clashes(root: Path, tmp_path: Path) -> None:
    dup = write_sqlite(tmp_path / "dup.db", [*image_rows(), ("101/a.png", 101, "101/b.png")])
    with pytest.raises(CatalogError, match=r"duplicate image ids \(1\): \['101/a.png'\]"):
        ingest(sql_cfg(dup, root))
    url = write_sqlite(tmp_path / "catalog.db")
    with sqlite3.connect(tmp_path / "catalog.db") as conn:
        conn.execute("ALTER TABLE images ADD COLUMN nsfw BOOLEAN")
    conn.close()
    with pytest.raises(CatalogError, match=r"columns \['nsfw'\] come from both"):
        ingest(sql_cfg(url, root))
    renamed = {**USER_MAPPING["image_columns"], "image_nsfw": "nsfw"}
    assert "image_nsfw" in ingest(sql_cfg(url, root, image_columns=renamed)).manifest.columns
    with pytest.raises(CatalogError, match=r"unknown columns \['nsfw'\] \(strict"):
        ingest(sql_cfg(url, root, strict=True))


def test_sql_rows_rejected_not_dropped(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "101" / "out.png").symlink_to(outside)
    bad = [
        ("up", 101, "../outside.png"),
        ("abs", 101, str(outside)),
        ("abs-inside", 102, str(root / "102" / "a.png")),
        ("link-out", 101, "101/out.png"),
        ("loop", 101, "loop.png"),
        ("nul", 101, "101/a.png\x00.jpg"),
        ("no-uri", 101, None),
        ("empty-uri", 101, ""),
        ("orphan", 999, "101/a.png"),
    ]
    url = write_sqlite(tmp_path / "catalog.db", [*image_rows(), *bad])
    result = ingest(sql_cfg(url, root))
    rejected = result.rejected.set_index(S.IMAGE_ID)
    assert list(result.rejected.columns) == list(S.QUARANTINE_COLUMNS)
    assert (result.rejected[S.STAGE] == "ingest").all()
    assert rejected[S.REASON].to_dict() == {
        "up": "unsafe_path",
        "abs": "unsafe_path",
        "link-out": "unsafe_path",
        "loop": "unsafe_path",
        "nul": "unsafe_path",
        "no-uri": "missing_value",
        "empty-uri": "missing_value",
    }
    assert "loop" in rejected.loc["loop", S.DETAIL] and "outside" in rejected.loc["up", S.DETAIL]
    manifest = result.manifest.set_index(S.IMAGE_ID)
    assert manifest.loc["abs-inside", S.PATH] == str((root / "102" / "a.png").resolve())
    assert manifest.loc["orphan", S.ITEM_ID] == "999" and pd.isna(
        manifest.loc["orphan", S.CATEGORY]
    )
    assert result.metrics["n_images"] == 7 and result.metrics["n_rejected"] == 7
    assert result.metrics["n_rejected_unsafe_path"] == 5 and result.metrics["n_orphan_images"] == 1
    assert len(result.manifest) + len(result.rejected) == len(image_rows()) + len(bad)
    result.rejected.to_parquet(tmp_path / "rejected.parquet")


def test_sql_integer_ids_stay_integers_as_text(root: Path, tmp_path: Path) -> None:
    db = tmp_path / "ints.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, type TEXT)")
        conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, model_id INTEGER, path TEXT)")
        conn.executemany(
            "INSERT INTO items VALUES (?, ?, ?)", [(101, "cat", "A"), (102, "dog", "B")]
        )
        conn.executemany(
            "INSERT INTO images VALUES (?, ?, ?)",
            [(1, 101, "101/a.png"), (2, 102, "102/a.png"), (3, None, "101/b.png")],
        )
    conn.close()
    result = ingest(sql_cfg(f"sqlite:///{db}", root))
    assert result.manifest[[S.IMAGE_ID, S.ITEM_ID]].values.tolist() == [["1", "101"], ["2", "102"]]
    assert result.rejected[[S.IMAGE_ID, S.REASON, S.DETAIL]].values.tolist() == [
        ["3", "missing_value", "empty item_id"]
    ]
    assert result.manifest[S.DOWNLOADS].isna().all()  # the catalog has none: empty, not 0


def test_sql_missing_database_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nope.db"
    with pytest.raises(CatalogError, match="not found"):
        ingest_sql(f"sqlite:///{db}", IngestConfig(data_root=str(tmp_path)))
    assert not db.exists()


def test_sql_default_data_root_is_the_database_folder(root: Path) -> None:
    url = write_sqlite(root / "catalog.db")
    result = ingest(IngestConfig(source="sql", url=url, **USER_MAPPING))  # type: ignore[arg-type]
    assert result.metrics["n_images"] == 5
    assert result.source["catalog_data_root"] == str(root.resolve())


# --- CSV / Parquet ------------------------------------------------------------------------------


def test_csv_missing_required_column(root: Path, tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "m.csv", "image_id,item_id,file\n101/a.png,101,101/a.png\n")
    with pytest.raises(CatalogError, match=r"missing required columns \['uri'\]"):
        ingest_table(csv, IngestConfig(data_root=str(root)))
    mapped = ingest_table(csv, IngestConfig(data_root=str(root), image_columns={"uri": "file"}))
    assert mapped.manifest[S.URI].tolist() == ["101/a.png"]


def test_csv_duplicated_columns(root: Path, tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "m.csv", "image_id,item_id,uri,uri\n101/a.png,101,101/a.png,101/b.png\n"
    )
    with pytest.raises(CatalogError, match=r"duplicated column names \['uri'\]"):
        ingest_table(csv, IngestConfig(data_root=str(root)))


def test_parquet_duplicated_columns(root: Path, tmp_path: Path) -> None:
    table = pa.Table.from_arrays(
        [pa.array(["101/a.png"]), pa.array(["101"]), pa.array(["101/a.png"]), pa.array(["x"])],
        names=["image_id", "item_id", "uri", "item_id"],
    )
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(CatalogError, match=r"duplicated column names \['item_id'\]"):
        ingest_table(tmp_path / "m.parquet", IngestConfig(data_root=str(root)))


def test_csv_extra_columns(root: Path, tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "m.csv",
        "image_id,item_id,uri,vendor,score\n101/a.png,101,101/a.png,google,0.5\n",
    )
    result = ingest_table(csv, IngestConfig(data_root=str(root)))
    assert result.manifest[["vendor", "score"]].iloc[0].tolist() == ["google", 0.5]  # pass through
    with pytest.raises(CatalogError, match=r"unknown columns \['vendor', 'score'\] \(strict"):
        ingest_table(csv, IngestConfig(data_root=str(root), strict=True))
    strict_mapped = ingest_table(
        csv,
        IngestConfig(
            data_root=str(root), strict=True, image_columns={"vendor": "vendor", "score": "score"}
        ),
    )
    assert "vendor" in strict_mapped.manifest.columns


def test_csv_columns_that_clash_with_pipeline_columns(root: Path, tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "m.csv", "image_id,item_id,uri,width,path\n101/a.png,101,101/a.png,4,/x\n"
    )
    with pytest.raises(CatalogError, match=r"\['width', 'path'\] clash"):
        ingest_table(csv, IngestConfig(data_root=str(root)))
    renamed = ingest_table(
        csv,
        IngestConfig(
            data_root=str(root), image_columns={"source_width": "width", "source_path": "path"}
        ),
    )
    assert renamed.manifest["source_width"].tolist() == [4]
    assert renamed.manifest[S.PATH].tolist() == [str((root / "101" / "a.png").resolve())]
    with pytest.raises(ConfigError, match="written by the pipeline"):
        IngestConfig(image_columns={"width": "w"})


def test_csv_duplicate_ids(root: Path, tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "m.csv",
        "image_id,item_id,uri\nA,101,101/a.png\nB,101,101/b.png\nA,102,102/a.png\nB,103,103/x.jpg\n",
    )
    with pytest.raises(CatalogError, match=r"duplicate image ids \(2\): \['A', 'B'\]"):
        ingest_table(csv, IngestConfig(data_root=str(root)))


def test_csv_ids_stay_text_and_mapping_may_reuse_a_column(root: Path, tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "m.csv", "file,model\n101/a.png,007\n101/b.png,007\n")
    cfg = IngestConfig(
        data_root=str(root), image_columns={"image_id": "file", "uri": "file", "item_id": "model"}
    )
    manifest = ingest_table(csv, cfg).manifest
    assert manifest[S.ITEM_ID].tolist() == ["007", "007"] and manifest[S.IMAGE_ID].tolist() == [
        "101/a.png",
        "101/b.png",
    ]


def test_table_path_attacks(root: Path, tmp_path: Path) -> None:
    (root / "103" / "escape").symlink_to(tmp_path, target_is_directory=True)
    (root / "l1").symlink_to(root / "l2")
    (root / "l2").symlink_to(root / "l1")
    lines = [
        "image_id,item_id,uri",
        "ok,101,101/a.png",
        "dotdot,101,101/../../outside.png",
        f"abs-out,101,{tmp_path / 'outside.png'}",
        f"abs-in,101,{root / '101' / 'b.png'}",
        "via-link,103,103/escape/outside.png",
        "loop,101,l1/x.png",
        "etc,101,/etc/passwd",
    ]
    csv = write_csv(tmp_path / "m.csv", "\n".join(lines) + "\n")
    result = ingest_table(csv, IngestConfig(data_root=str(root)))
    assert sorted(result.manifest[S.IMAGE_ID]) == ["abs-in", "ok"]
    assert dict(zip(result.rejected[S.IMAGE_ID], result.rejected[S.REASON], strict=True)) == {
        k: "unsafe_path" for k in ("dotdot", "abs-out", "via-link", "loop", "etc")
    }
    assert result.rejected.set_index(S.IMAGE_ID).loc["dotdot", S.URI] == "101/../../outside.png"


def test_table_filters_and_formats(root: Path, tmp_path: Path) -> None:
    frame = table_frame()
    frame.to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    result = ingest_table(
        tmp_path / "m.tsv", IngestConfig(data_root=str(root), filters={"item_id": [101, "103"]})
    )
    assert sorted(result.manifest[S.ITEM_ID].unique()) == ["101", "103"]
    injected = ingest_table(
        tmp_path / "m.tsv", IngestConfig(data_root=str(root), filters={"category": INJECTION})
    )
    assert len(injected.manifest) == 0
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(CatalogError, match="unknown table format"):
        ingest_table(tmp_path / "m.xlsx", IngestConfig(data_root=str(root)))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CatalogError, match="cannot read"):
        ingest_table(tmp_path / "empty.csv", IngestConfig(data_root=str(root)))


def test_non_utf8_uri_in_a_csv(root: Path, tmp_path: Path) -> None:
    name = os.fsencode(root) + b"/101/caf\xe9.png"
    with open(name, "wb") as fh:
        fh.write(b"bytes")
    (tmp_path / "m.csv").write_bytes(b"image_id,item_id,uri\nlatin,101,101/caf\xe9.png\n")
    result = ingest_table(tmp_path / "m.csv", IngestConfig(data_root=str(root)))
    row = result.manifest.iloc[0]
    assert row[S.URI] == "file:101/caf%E9.png"
    assert (
        os.fsencode(str_to_path(row[S.PATH])) == os.fsencode(root.resolve()) + b"/101/caf\xe9.png"
    )
    result.manifest.to_parquet(tmp_path / "manifest.parquet")


# --- folder -------------------------------------------------------------------------------------


def test_folder_listing(root: Path, tmp_path: Path) -> None:
    (root / "101" / "notes.txt").write_text("validation decides")
    (root / "101" / "noext").write_bytes(b"\x89PNG")
    (root / "101" / ".hidden.png").write_bytes(b"x")
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"x")
    (root / "loose.png").write_bytes(b"x")
    os.mkfifo(root / "102" / "pipe.png")
    result = ingest_folder(root)
    ids = result.manifest[S.IMAGE_ID].tolist()
    assert ids == sorted(ids)
    assert "101/notes.txt" in ids and "101/noext" in ids and "102/sub/c.png" in ids
    assert not any(".hidden" in i or ".git" in i for i in ids)
    assert result.manifest.set_index(S.IMAGE_ID).loc["102/sub/c.png", S.ITEM_ID] == "102"
    reasons = dict(zip(result.rejected[S.IMAGE_ID], result.rejected[S.REASON], strict=True))
    assert reasons == {
        "loose.png": "no_item",
        "102/pipe.png": "not_a_file",
        "101/.hidden.png": "hidden",  # skipped, but recorded
        ".git": "hidden",  # one row for the folder; its content is not walked
    }


def test_folder_symlinks(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e.png").write_bytes(b"x")
    (root / "out").symlink_to(
        tmp_path / "elsewhere", target_is_directory=True
    )  # folder out of root
    (root / "101" / "up").symlink_to(root / "101", target_is_directory=True)  # loop to an ancestor
    (root / "102" / "top").symlink_to(root, target_is_directory=True)  # the data root itself
    (root / "alias").symlink_to(root / "102", target_is_directory=True)  # the same folder twice
    (root / "103" / "secret.png").symlink_to(tmp_path / "outside.png")  # file out of root
    (root / "103" / "self.png").symlink_to(root / "103" / "self.png")  # file loop
    result = ingest_folder(root)
    reasons = dict(zip(result.rejected[S.IMAGE_ID], result.rejected[S.REASON], strict=True))
    assert reasons == {
        "out": "unsafe_path",
        "101/up": "duplicate_folder",
        "102/top": "unsafe_path",
        "alias": "duplicate_folder",
        "103/secret.png": "unsafe_path",
        "103/self.png": "unsafe_path",
    }
    assert len(result.manifest) == 5  # the collection, once


def test_folder_inside_a_larger_data_root(root: Path, tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "s.png").write_bytes(b"x")
    (root / "104").symlink_to(tmp_path / "shared", target_is_directory=True)
    result = ingest_folder(root, IngestConfig(data_root=str(tmp_path)))
    manifest = result.manifest.set_index(S.IMAGE_ID)
    assert manifest.loc["101/a.png", S.URI] == "data/101/a.png"
    assert manifest.loc["104/s.png", S.PATH] == str((tmp_path / "shared" / "s.png").resolve())
    with pytest.raises(ConfigError, match="not inside data_root"):
        ingest_folder(root, IngestConfig(data_root=str(root / "101")))


def test_folder_non_utf8_names(root: Path, tmp_path: Path) -> None:
    item = os.fsencode(root) + b"/\xffitem"
    os.mkdir(item)
    with open(item + b"/caf\xe9.png", "wb") as fh:
        fh.write(b"bytes")
    result = ingest_folder(root)
    row = result.manifest[result.manifest[S.ITEM_ID] == "\\xffitem"].iloc[0]
    assert row[S.IMAGE_ID] == "\\xffitem/caf\\xe9.png"
    assert row[S.URI] == "file:%FFitem/caf%E9.png"
    assert str_to_path(row[S.PATH]).read_bytes() == b"bytes"
    result.manifest.to_parquet(tmp_path / "manifest.parquet")  # UTF-8 only: must not raise


def test_folder_non_utf8_name_beside_its_escaped_spelling(root: Path, tmp_path: Path) -> None:
    """``caf\\xe9.png`` (not UTF-8) and a file literally named ``caf\\xe9.png``: escaping
    makes them one id; the batch goes on, the escaped one is quarantined with its reason."""
    with open(os.fsencode(root) + b"/101/caf\xe9.png", "wb") as fh:
        fh.write(b"latin-1 name")
    (root / "101" / "caf\\xe9.png").write_bytes(b"literal name")
    os.mkdir(os.fsencode(root) + b"/x\xff")  # an item folder, and one spelled like its escape
    (root / "x\\xff").mkdir()
    with open(os.fsencode(root) + b"/x\xff/1.png", "wb") as fh:
        fh.write(b"a")
    (root / "x\\xff" / "2.png").write_bytes(b"b")
    result = ingest_folder(root)
    manifest = result.manifest.set_index(S.IMAGE_ID)
    assert manifest.loc["101/caf\\xe9.png", S.URI] == "101/caf\\xe9.png"
    assert str_to_path(manifest.loc["101/caf\\xe9.png", S.PATH]).read_bytes() == b"literal name"
    assert manifest.loc["x\\xff/2.png", S.ITEM_ID] == "x\\xff"
    assert not manifest.index.duplicated().any()
    rejected = result.rejected.set_index(S.IMAGE_ID)
    assert rejected.loc["101/caf\\xe9.png", S.REASON] == "ambiguous_id"
    assert rejected.loc["101/caf\\xe9.png", S.URI] == "file:101/caf%E9.png"
    assert rejected.loc["x\\xff/1.png", S.REASON] == "ambiguous_id"  # two items would merge
    assert result.metrics["n_rejected_ambiguous_id"] == 2
    result.rejected.to_parquet(tmp_path / "rejected.parquet")  # UTF-8 only: must not raise


def test_folder_names_are_names_not_uris(root: Path) -> None:
    (root / "file:weird").mkdir()
    (root / "file:weird" / "a.png").write_bytes(b"weird")
    (root / "FILE:%41").mkdir()
    (root / "FILE:%41" / "b.png").write_bytes(b"percent")
    result = ingest_folder(root)
    manifest = result.manifest.set_index(S.IMAGE_ID)
    assert manifest.loc["file:weird/a.png", S.ITEM_ID] == "file:weird"
    assert str_to_path(manifest.loc["file:weird/a.png", S.PATH]).read_bytes() == b"weird"
    assert str_to_path(manifest.loc["FILE:%41/b.png", S.PATH]).read_bytes() == b"percent"
    for uri in manifest[S.URI]:  # every uri reads back as the file it was listed from
        assert resolve_within(root, uri).is_file(), uri
    assert len(result.rejected) == 0


def test_csv_row_with_more_fields_than_the_header_is_refused(root: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.csv"  # pandas would take image_id as the index and shift the rest
    first.write_text("image_id,item_id,uri\na,101,101/a.png,oops\nb,101,101/b.png\n")
    with pytest.raises(CatalogError, match=r"more fields than the header.*lines \[2\]"):
        ingest_table(first, IngestConfig(data_root=str(root)))
    later = tmp_path / "later.tsv"
    later.write_text("image_id\titem_id\turi\na\t101\t101/a.png\nb\t101\t101/b.png\tx\n")
    with pytest.raises(CatalogError, match="line 3"):
        ingest_table(later, IngestConfig(data_root=str(root)))
    # a trailing separator on every line loses nothing: read as it reads
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("image_id,item_id,uri\na,101,101/a.png,\nb,101,101/b.png,\n")
    manifest = ingest_table(trailing, IngestConfig(data_root=str(root))).manifest
    assert manifest[S.URI].tolist() == ["101/a.png", "101/b.png"]


def test_a_catalog_without_images_stops_at_ingest(root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no usable images"):
        ingest_folder(tmp_path / "empty")
    (tmp_path / "header.csv").write_text("image_id,item_id,uri\n")
    with pytest.raises(CatalogError, match="no usable images"):
        ingest_table(tmp_path / "header.csv", IngestConfig(data_root=str(root)))
    (tmp_path / "outside.csv").write_text("image_id,item_id,uri\na,1,../../etc/passwd\n")
    with pytest.raises(CatalogError, match="all rejected.*unsafe_path"):
        ingest_table(tmp_path / "outside.csv", IngestConfig(data_root=str(root)))
    # images directly in the folder, outside any item folder: the error says how to lay them out
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        (flat / name).write_bytes((root / "101" / "a.png").read_bytes())
    with pytest.raises(CatalogError, match=r"2 entries rejected.*no_item.*one folder per item"):
        ingest_folder(flat)
    # filters that leave nothing are a choice: an empty manifest, not an error
    chosen = ingest_folder(root, IngestConfig(filters={"item_id": "no-such-item"}))
    assert len(chosen.manifest) == 0


def test_a_numeric_path_override_stays_a_path(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--path 2024`` reaches the config as YAML ``2024`` (an int): still the folder ``2024``."""
    (root / "2024").mkdir()
    (root / "2024" / "201").mkdir()
    (root / "2024" / "201" / "a.png").write_bytes(b"x")
    monkeypatch.chdir(root)
    all_cfg = load_config(None, {"ingest.source": "folder", "ingest.path": "2024"})
    cfg = from_dict(IngestConfig, all_cfg["ingest"])
    assert cfg.path == "2024"
    assert ingest(cfg).manifest[S.IMAGE_ID].tolist() == ["201/a.png"]


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = from_dict(IngestConfig, load_config()["ingest"])
    assert cfg.source == "sql" and cfg.url is None and cfg.filters == {}
    with pytest.raises(ConfigError, match="source"):
        IngestConfig(source="excel")
    with pytest.raises(ConfigError, match="url is required"):
        ingest(IngestConfig(source="sql"))
    with pytest.raises(ConfigError, match="path is required"):
        ingest(IngestConfig(source="folder"))
    with pytest.raises(CatalogError, match="data root not found"):
        ingest(IngestConfig(source="folder", path=str(tmp_path), data_root=str(tmp_path / "nope")))


def test_sql_errors_hide_the_password(tmp_path: Path) -> None:
    url = "postgresql://reader:s3cret@127.0.0.1:1/catalog"
    with pytest.raises(CatalogError) as info:
        ingest(IngestConfig(source="sql", url=url, data_root=str(tmp_path)))
    assert "s3cret" not in str(info.value) and "reader:***@127.0.0.1" in str(info.value)
    with pytest.raises(ConfigError, match="not a SQLAlchemy URL"):
        ingest(IngestConfig(source="sql", url="not a url", data_root=str(tmp_path)))


# --- the step -----------------------------------------------------------------------------------


@pytest.mark.slow  # creating the MLflow SQLite store takes seconds
def test_ingest_step_logs_manifest_and_rejected(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from steps import ingest as step
    from steps.common import read_df

    (root / "loose.png").write_bytes(b"x")
    monkeypatch.delenv("IMGSEARCH_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)  # a private MLflow store and artifact folder
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("test-ingest")
    try:
        run_id = step.run({"ingest.source": "folder", "ingest.path": str(root), "ingest.url": ""})
        run = mlflow.get_run(run_id)
        assert read_df(run_id, "manifest.parquet")[S.IMAGE_ID].tolist() == sorted(
            u for u, _, _ in image_rows()
        )
        assert read_df(run_id, "rejected.parquet")[S.REASON].tolist() == ["no_item"]
        assert run.data.metrics["n_images"] == 5 and run.data.metrics["n_rejected"] == 1
        assert run.data.params["catalog_source"] == f"folder {root.resolve()}"
        assert run.data.params["source"] == "folder"
    finally:
        mlflow.set_tracking_uri(None)
