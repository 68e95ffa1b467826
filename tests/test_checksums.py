"""Issue #17 point 2: checksums live in the registry, not beside the files they protect.

An index rewritten together with its sidecar ``index.json`` hash (what anyone who can write the
artifact store can do) is refused before FAISS parses it; so are rewritten extractor weights.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_registry)
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from imgsearch.errors import IndexIntegrityError
from registry import integrity
from tests.test_registry import env, names, pair  # noqa: F401  (fixtures)


def test_versions_carry_checksums(env, pair) -> None:
    cfg, registered = pair
    idx, ext = registered.index.tags, registered.extractor.tags
    assert idx["sha256.index/index.faiss"] and idx["sha256.extractor/weights.pt"]
    assert ext["sha256.extractor/weights.pt"] == idx["sha256.extractor/weights.pt"]
    assert integrity.TAG_MODEL_TREE in idx and integrity.TAG_MODEL_TREE in ext


def _store_copy(env, name: str, version: str) -> Path:
    """Where the artifact store keeps the logged model: find it by the model's MLmodel file."""
    client = env.client()
    source = client.get_model_version(name, version).source  # models:/m-<id>
    logged = client.get_logged_model(source.removeprefix("models:/"))
    return Path(logged.artifact_location.removeprefix("file://"))


def test_index_rewritten_with_its_sidecar_hash_is_refused(env, pair, tmp_path) -> None:
    cfg, registered = pair
    store = _store_copy(env, cfg.index_name, str(registered.index.version))
    index_dir = store / "artifacts" / "index"
    saved = tmp_path / "saved"
    shutil.copytree(store, saved)
    try:
        data = bytearray((index_dir / "index.faiss").read_bytes())
        data[-1] ^= 0xFF
        (index_dir / "index.faiss").write_bytes(bytes(data))
        info = json.loads((index_dir / "index.json").read_text())
        info["sha256"]["index.faiss"] = hashlib.sha256(bytes(data)).hexdigest()  # rehashed
        (index_dir / "index.json").write_text(json.dumps(info))
        uri = f"models:/{cfg.index_name}/{registered.index.version}"
        with pytest.raises(IndexIntegrityError) as exc:
            integrity.load_verified(uri, client=env.client())
        assert registered.index.tags[integrity.TAG_MODEL_TREE] in str(exc.value)

        # the per-file check inside the pyfunc refuses it too, naming both hashes
        expected = integrity.checksum_tags(registered.index.tags)
        with pytest.raises(integrity.ArtifactIntegrityError) as exc:
            integrity.verify_artifact("index", index_dir, expected)
        assert expected["sha256.index/index.faiss"] in str(exc.value)
        assert hashlib.sha256(bytes(data)).hexdigest() in str(exc.value)
    finally:
        shutil.rmtree(store)
        shutil.copytree(saved, store)


def test_rewritten_extractor_weights_are_refused_before_torch_load(env, pair, tmp_path) -> None:
    cfg, registered = pair
    local = tmp_path / "extractor"
    shutil.copytree(env.extractor_dir, local)
    (local / "weights.pt").write_bytes(b"not the registered weights")
    expected = integrity.checksum_tags(registered.extractor.tags)
    with pytest.raises(integrity.ArtifactIntegrityError, match="weights.pt"):
        integrity.verify_artifact("extractor", local, expected)


def test_verified_load_serves_the_registered_bytes(env, pair) -> None:
    cfg, registered = pair
    model = integrity.load_verified(
        f"models:/{cfg.index_name}/{registered.index.version}", client=env.client()
    )
    assert model.unwrap_python_model().index.count > 0
