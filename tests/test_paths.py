"""resolve_within: the path attacks of RELIABILITY #6, and non-UTF-8 names carried through str."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from imgsearch.errors import UnsafePathError
from imgsearch.paths import Resolver, atomic_writer, path_to_str, resolve_within, str_to_path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/item/a.png inside the data root, outside/secret.png next to it."""
    root = tmp_path / "root"
    (root / "item").mkdir(parents=True)
    (root / "item" / "a.png").write_bytes(b"png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    return root, outside


def test_relative_and_absolute_inside(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    want = (root / "item" / "a.png").resolve()
    assert resolve_within(root, "item/a.png") == want
    assert resolve_within(root, str(want)) == want
    assert (
        resolve_within(root, "item/./../item/a.png") == want
    )  # a `..` that stays inside is harmless
    assert resolve_within(root, "item/missing.png") == root.resolve() / "item" / "missing.png"


@pytest.mark.parametrize(
    "uri",
    ["../outside/secret.png", "item/../../outside/secret.png", "../../../../../etc/passwd"],
)
def test_dotdot_escape_refused(tree: tuple[Path, Path], uri: str) -> None:
    root, _ = tree
    with pytest.raises(UnsafePathError, match="outside the data root"):
        resolve_within(root, uri)


def test_absolute_outside_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_within(root, str(outside / "secret.png"))
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_within(root, "/etc/passwd")
    # a sibling whose name merely starts like the root is outside too
    sibling = root.parent / "root2"
    sibling.mkdir()
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_within(root, str(sibling / "x.png"))


def test_symlink_out_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "item" / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "dangling.png").symlink_to(outside / "nothing-here.png")
    for uri in ("item/link.png", "linkdir/secret.png", "dangling.png"):
        with pytest.raises(UnsafePathError, match="outside"):
            resolve_within(root, uri)


def test_symlink_inside_allowed(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "alias.png").symlink_to(root / "item" / "a.png")
    assert resolve_within(root, "alias.png") == (root / "item" / "a.png").resolve()


def test_symlink_loops_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "l1").symlink_to(root / "l2")
    (root / "l2").symlink_to(root / "l1")
    (root / "self").symlink_to(root / "self")
    for uri in ("l1", "self", "l1/x.png", "missing/../l1", "missing/../l1/../../../etc/passwd"):
        with pytest.raises(UnsafePathError, match="loop|outside"):
            resolve_within(root, uri)


@pytest.mark.parametrize(
    "uri", ["", "item/a.png\x00.jpg", "file:", "file://evil.example/etc/passwd"]
)
def test_bad_strings_refused(tree: tuple[Path, Path], uri: str) -> None:
    root, _ = tree
    with pytest.raises(UnsafePathError):
        resolve_within(root, uri)


def test_root_itself_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with pytest.raises(UnsafePathError, match="data root itself"):
        resolve_within(root, ".")


def test_root_reached_through_symlink(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    via = root.parent / "via"
    via.symlink_to(root, target_is_directory=True)
    assert resolve_within(via, "item/a.png") == (root / "item" / "a.png").resolve()
    assert resolve_within(via, str(via / "item" / "a.png")) == (root / "item" / "a.png").resolve()


def test_non_utf8_names_round_trip(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    raw = os.fsencode(root) + b"/item/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(b"latin-1 name")
    name = os.fsdecode(b"item/caf\xe9.png")  # surrogate-escaped str
    resolved = resolve_within(root, name)
    assert os.fsencode(resolved) == os.fsencode(root.resolve()) + b"/item/caf\xe9.png"
    text = path_to_str(resolved)
    text.encode("utf-8")  # storable in Parquet
    assert text.startswith("file:///") and "caf%E9.png" in text
    assert str_to_path(text).read_bytes() == b"latin-1 name"
    rel = path_to_str(name)
    assert rel == "file:item/caf%E9.png"
    assert resolve_within(root, rel) == resolved  # the escaped form resolves back
    # and survives Parquet
    frame = pd.DataFrame({"path": [text]})
    frame.to_parquet(root / "m.parquet")
    assert str_to_path(pd.read_parquet(root / "m.parquet")["path"][0]) == resolved


def test_utf8_paths_unchanged() -> None:
    assert path_to_str("/data/café/ü.png") == "/data/café/ü.png"
    assert str_to_path("/data/café/ü.png") == Path("/data/café/ü.png")
    assert str_to_path("file:///data/my%20file.png") == Path("/data/my file.png")
    assert str_to_path("file://localhost/data/x.png") == Path("/data/x.png")


def test_resolver_matches_resolve_within(tree: tuple[Path, Path]) -> None:
    """One Resolver over a batch (folder cache) decides exactly like one resolve_within per uri."""
    root, outside = tree
    (root / "item" / "out.png").symlink_to(outside / "secret.png")
    (root / "item" / "in.png").symlink_to(root / "item" / "a.png")
    (root / "item" / "loop.png").symlink_to(root / "item" / "loop.png")
    (root / "jump").symlink_to(outside, target_is_directory=True)
    uris = [
        "item/a.png", "item/out.png", "item/in.png", "item/loop.png", "item/missing.png",
        "item/../item/a.png", "item/..", "jump/secret.png", "jump/../root/item/a.png",
        "item/a.png/", str(root / "item" / "a.png"), str(outside / "secret.png"), "item/a.png",
    ]  # fmt: skip

    def outcome(resolve: object, uri: str) -> str:
        try:
            return str(resolve(uri))  # type: ignore[operator]
        except UnsafePathError as exc:
            return f"refused: {exc}"

    resolver = Resolver(root)
    batch = [outcome(resolver.resolve, u) for u in uris]
    single = [outcome(lambda u: resolve_within(root, u), u) for u in uris]
    assert batch == single
    assert [b.startswith("refused") for b in batch] == [
        False, True, False, True, False, False, True, True, False, False, False, True, False,
    ]  # fmt: skip  # jump/../root/... comes back in, as the kernel would see it


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_writer_leaves_the_old_file_or_the_new_one(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "sub" / "state.json"
    with atomic_writer(target, durable=durable) as fh:
        fh.write(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target, durable=durable) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temporary file left
    with atomic_writer(target, durable=durable) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"
