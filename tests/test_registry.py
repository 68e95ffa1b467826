"""Registry: pyfunc models, idempotent registration, the promotion gate, rollback, store failures.

One temporary SQLite tracking store per module (creating its tables takes seconds); each test uses
its own registered model names, so tests do not see each other's aliases.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw

from imgsearch.data.imageio import open_rgb
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ExtractorMismatchError, IndexIntegrityError
from imgsearch.models.backbones import create_extractor, fingerprint, save_extractor
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.query import embed_images
from imgsearch.search.ranking import RankingConfig
from registry import models
from registry.promote import (
    TAG_PREVIOUS_CHAMPION,
    RegistryUnavailableError,
    promote,
    rollback,
)
from registry.register import (
    INPUT_EXTRACT_RUN,
    INPUT_SPLIT_RUN,
    TAG_DATA_HASH,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_INDEX_VERSION,
    TAG_SOURCE_RUN,
    RegisterConfig,
    RegisteredPair,
    RegistryError,
    data_hash_of,
    log_index_model,
    register_pair,
    select_metrics,
)
from steps.artifacts import local_artifact

N_IMAGES = 6
_names = itertools.count()


# --- fixtures ----------------------------------------------------------------------------------


def png_bytes(seed: int, size: int = 64) -> bytes:
    """A distinct synthetic picture: a background colour and four coloured rectangles."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    im = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 4, 2))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_extractor_dir(path: Path, seed: int) -> Path:
    """A random-init MobileNetV2 with 64 px inputs (fast), saved as a save_extractor directory."""
    torch.manual_seed(seed)
    ext = create_extractor("mobilenet_v2", weights="none")
    ext.spec = dataclasses.replace(ext.spec, preprocess=PreprocessConfig(size=64))
    save_extractor(ext, path)
    return path


def make_index_dir(path: Path, extractor_dir: Path, images: list[bytes]) -> Path:
    from imgsearch.models.backbones import load_extractor

    ext = load_extractor(extractor_dir)
    emb = embed_images(ext, [open_rgb(b) for b in images])
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(len(images))],
            "item_id": [f"item{i // 2}" for i in range(len(images))],
            "item_name": [f"thing {i // 2}" for i in range(len(images))],
            "category": ["a" if i % 2 else "b" for i in range(len(images))],
        }
    )
    index = ImageIndex.build(emb, meta, IndexConfig(factory="Flat"), fingerprint(ext))
    index.save(path)
    return path


@dataclasses.dataclass
class Env:
    uri: str
    experiment_id: str
    root: Path
    images: list[bytes]
    extractor_dir: Path
    index_dir: Path
    other_extractor_dir: Path

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


_TEMPLATE_DB: list[Path] = []


def fresh_tracking_uri(tmp_path_factory: pytest.TempPathFactory, directory: Path) -> str:
    """A ``sqlite:///`` URI of a new, empty MLflow database in ``directory``.

    Creating the tables runs every MLflow migration (10+ s on a busy machine): it is done once
    per session and the empty database file copied after that.
    """
    if not _TEMPLATE_DB:
        template = tmp_path_factory.mktemp("template-db") / "mlflow.db"
        uri = f"sqlite:///{template}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments()
        client.search_registered_models()
        _TEMPLATE_DB.append(template)
    target = directory / "mlflow.db"
    shutil.copyfile(_TEMPLATE_DB[0], target)
    return f"sqlite:///{target}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("registry")
    uri = fresh_tracking_uri(tmp_path_factory, root)
    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.create_experiment(
            "registry-tests", artifact_location=(root / "artifacts").as_uri()
        )
        images = [png_bytes(i) for i in range(N_IMAGES)]
        ext_dir = make_extractor_dir(root / "extractor", seed=0)
        yield Env(
            uri=uri,
            experiment_id=exp,
            root=root,
            images=images,
            extractor_dir=ext_dir,
            index_dir=make_index_dir(root / "index", ext_dir, images),
            other_extractor_dir=make_extractor_dir(root / "extractor2", seed=1),
        )
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


def names() -> RegisterConfig:
    n = next(_names)
    return RegisterConfig(extractor_name=f"t{n}-extractor", index_name=f"t{n}-index")


def register(env: Env, cfg: RegisterConfig, metric: float, run_name: str = "register", **kw):
    """Register the env's pair from a fresh run (a distinct source run => a distinct version)."""
    with mlflow.start_run(experiment_id=env.experiment_id, run_name=run_name) as run:
        pair = register_pair(
            env.extractor_dir,
            env.index_dir,
            RankingConfig(),
            extractor_run_id=kw.pop("extractor_run_id", run.info.run_id),
            index_run_id=kw.pop("index_run_id", run.info.run_id),
            metrics={"map_at_r": metric, "hit_at_1": metric},
            cfg=cfg,
            client=env.client(),
            **kw,
        )
    return pair


@pytest.fixture(scope="module")
def pair(env: Env) -> tuple[RegisterConfig, RegisteredPair]:
    """One pair registered for real (logged models with artifacts); other tests reuse it.

    Its artifacts are attributed to an "upstream" run (standing for the extract and index runs)
    distinct from the register run, as the register step does.
    """
    cfg = names()
    with mlflow.start_run(experiment_id=env.experiment_id, run_name="upstream") as upstream:
        pass
    rid = upstream.info.run_id
    return cfg, register(env, cfg, 0.5, extractor_run_id=rid, index_run_id=rid)


SPLIT_RUN: list[str] = []


def upstream_runs(env: Env, metric: float, split_run: str | None = None) -> tuple[str, str, str]:
    """(extract, index, evaluate) run ids tagged as the steps tag them: the index run and the
    evaluate run both name the extract run; the evaluate run names the split run it measured."""
    if split_run is None:
        if not SPLIT_RUN:
            with mlflow.start_run(experiment_id=env.experiment_id, run_name="split") as run:
                pass
            SPLIT_RUN.append(run.info.run_id)
        split_run = SPLIT_RUN[0]
    with mlflow.start_run(experiment_id=env.experiment_id, run_name="extract") as ex:
        pass
    inputs = {INPUT_EXTRACT_RUN: ex.info.run_id, INPUT_SPLIT_RUN: split_run}
    with mlflow.start_run(experiment_id=env.experiment_id, run_name="index") as ix:
        mlflow.set_tags(inputs)
    with mlflow.start_run(experiment_id=env.experiment_id, run_name="evaluate") as ev:
        mlflow.set_tags(inputs)
        mlflow.log_params({"evaluate.split": "test"})
        mlflow.log_metrics({"map_at_r": metric})
    return ex.info.run_id, ix.info.run_id, ev.info.run_id


def clone(env: Env, base: RegisteredPair, cfg: RegisterConfig, metric: float) -> RegisteredPair:
    """A new version pair under ``cfg``'s names that points at ``base``'s logged models: what
    register_pair makes, without logging the 14 MB of weights again (the gate reads tags and the
    evaluate run they name; the smoke check loads the real model through the version's source).
    Each clone gets its own extract/index/evaluate runs, measured on the same split run."""
    client = env.client()
    for name in (cfg.extractor_name, cfg.index_name):
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
    ex, ix, ev = upstream_runs(env, metric)
    metric_tag = {"metric.map_at_r": repr(float(metric)), "evaluate_run_id": ev}
    keep = (TAG_DATA_HASH, TAG_FINGERPRINT)
    sums = {k: v for k, v in base.index.tags.items() if k.startswith("sha256.")}
    ext_sums = {k: v for k, v in base.extractor.tags.items() if k.startswith("sha256.")}
    ext = client.create_model_version(
        cfg.extractor_name,
        base.extractor.source,
        run_id=base.extractor.run_id,
        tags={
            **{k: base.extractor.tags[k] for k in keep},
            **metric_tag,
            **ext_sums,
            TAG_SOURCE_RUN: ex,
        },
    )
    idx = client.create_model_version(
        cfg.index_name,
        base.index.source,
        run_id=base.index.run_id,
        tags={
            **{k: base.index.tags[k] for k in keep},
            **metric_tag,
            **sums,
            TAG_SOURCE_RUN: ix,
            TAG_EXTRACTOR_VERSION: str(ext.version),
        },
    )
    client.set_model_version_tag(
        cfg.extractor_name, str(ext.version), TAG_INDEX_VERSION, str(idx.version)
    )
    client.set_registered_model_alias(cfg.extractor_name, "challenger", str(ext.version))
    client.set_registered_model_alias(cfg.index_name, "challenger", str(idx.version))
    return RegisteredPair(
        client.get_model_version(cfg.extractor_name, str(ext.version)),
        client.get_model_version(cfg.index_name, str(idx.version)),
        reused=False,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


# --- registration ------------------------------------------------------------------------------


def test_register_tags_aliases_and_idempotent_retry(env: Env, pair) -> None:
    cfg, first = pair
    client = env.client()
    ext, idx = first.extractor, first.index
    assert not first.reused
    upstream = idx.tags[TAG_SOURCE_RUN]
    assert upstream != idx.tags["register_run_id"]
    assert idx.tags[TAG_EXTRACTOR_VERSION] == str(ext.version)
    assert ext.tags[TAG_INDEX_VERSION] == str(idx.version)
    assert ext.tags[TAG_SOURCE_RUN] == upstream
    assert idx.tags[TAG_FINGERPRINT] == ext.tags[TAG_FINGERPRINT]
    meta = ImageIndex.load(env.index_dir).meta
    assert idx.tags[TAG_DATA_HASH] == ext.tags[TAG_DATA_HASH] == data_hash_of(meta)
    assert float(idx.tags["metric.map_at_r"]) == 0.5
    assert aliases(client, cfg.index_name) == {"challenger": str(idx.version)}
    assert aliases(client, cfg.extractor_name) == {"challenger": str(ext.version)}

    # a retried step (new run, same inputs) finds the versions instead of making new ones
    again = register(env, cfg, 0.5, extractor_run_id=upstream, index_run_id=upstream)
    assert again.reused
    assert (again.extractor.version, again.index.version) == (ext.version, idx.version)
    assert len(client.search_model_versions(f"name = '{cfg.index_name}'")) == 1
    assert len(client.search_model_versions(f"name = '{cfg.extractor_name}'")) == 1


def test_an_int8_pair_registers_an_index_that_asks_for_int8(env: Env) -> None:
    cfg = names()
    pair = register(env, cfg, 0.5, serving_mode="int8")
    local = local_artifact(f"models:/{cfg.index_name}/{pair.index.version}")
    config = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert config["config"]["serving_mode"] == "int8"
    assert config["config"]["int8_tolerance"] == 0.005


def test_registered_models_are_code_not_pickles(env: Env, pair) -> None:
    """Both pyfuncs are stored as models-from-code: loading one unpickles no Python object."""
    cfg, first = pair
    for name, version in (
        (cfg.index_name, first.index.version),
        (cfg.extractor_name, first.extractor.version),
    ):
        local = local_artifact(f"models:/{name}/{version}")
        assert not list(local.rglob("*.pkl")), name
        assert "python_model.pkl" not in (local / "MLmodel").read_text()


def test_data_hash_ignores_row_order_and_sees_changes() -> None:
    meta = pd.DataFrame({"image_id": ["a", "b", "c"], "sha256": ["1", "2", "3"], "x": [1, 2, 3]})
    assert data_hash_of(meta) == data_hash_of(meta.iloc[::-1])
    assert data_hash_of(meta) == data_hash_of(meta.drop(columns="x"))
    changed = meta.assign(sha256=["1", "2", "4"])
    assert data_hash_of(meta) != data_hash_of(changed)
    assert data_hash_of(meta) != data_hash_of(meta.iloc[:2])


def test_select_metrics_prefers_test_prefix() -> None:
    got = select_metrics({"test.map_at_r": 0.7, "map_at_r": 0.1, "hit_at_1": 0.9}, ["test.", ""])
    assert got == {"map_at_r": 0.7, "hit_at_1": 0.9}
    assert select_metrics({"test.map_at_r": 0.7, "x": 1.0}, ["test.", ""], ["map_at_r"]) == {
        "map_at_r": 0.7
    }


def test_mismatched_extractor_is_refused_before_anything_is_logged(env: Env) -> None:
    cfg, client = names(), env.client()
    with mlflow.start_run(experiment_id=env.experiment_id):
        with pytest.raises(ExtractorMismatchError):
            log_index_model(
                env.other_extractor_dir,
                env.index_dir,
                RankingConfig(),
                name=cfg.index_name,
                client=client,
            )
    assert client.search_model_versions(f"name = '{cfg.index_name}'") == []


def test_index_model_refuses_mismatched_pair_at_load(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(
        path,
        python_model=models.IndexModel(),
        artifacts={"extractor": str(env.other_extractor_dir), "index": str(env.index_dir)},
        pip_requirements=["mlflow"],
    )
    with pytest.raises(ExtractorMismatchError):
        mlflow.pyfunc.load_model(str(path))


def test_tampered_index_is_refused(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "index"
    shutil.copytree(env.index_dir, bad)
    data = bytearray((bad / "index.faiss").read_bytes())
    data[-1] ^= 0xFF
    (bad / "index.faiss").write_bytes(bytes(data))
    with mlflow.start_run(experiment_id=env.experiment_id):
        with pytest.raises(IndexIntegrityError):
            log_index_model(
                env.extractor_dir,
                bad,
                RankingConfig(),
                name=names().index_name,
                client=env.client(),
            )


# --- the pyfunc models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_model(pair: tuple[RegisterConfig, RegisteredPair]):
    cfg, registered = pair
    return mlflow.pyfunc.load_model(f"models:/{cfg.index_name}/{registered.index.version}")


def test_index_model_batch_query_ranks_the_image_itself_first(env: Env, index_model) -> None:
    query = pd.DataFrame(
        {"image": [b64(env.images[0]), env.images[3]]}
    )  # base64 text and raw bytes
    out = index_model.predict(query, params={"k": 3})
    assert list(out.columns[: len(models.RESULT_COLUMNS)]) == list(models.RESULT_COLUMNS)
    assert models.ERROR in out.columns
    assert out.groupby("query").size().to_dict() == {0: 3, 1: 3}
    top = out[out["rank"] == 1].set_index("query")
    assert top.loc[0, "image_id"] == "img0" and top.loc[1, "image_id"] == "img3"
    assert top.loc[1, "item_id"] == "item1" and top.loc[1, "item_name"] == "thing 1"
    scores = out[out["query"] == 0]["similarity"].astype(float).to_numpy()
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(out[out["query"] == 0]["score"].astype(float).to_numpy()) <= 1e-6)
    assert out[models.ERROR].isna().all()
    assert not models.SERVER_ONLY_COLUMNS & set(out.columns)  # no server paths, hashes or splits


def test_index_model_bad_image_in_batch_gets_an_error_row(env: Env, index_model) -> None:
    query = pd.DataFrame({"image": [b64(b"definitely not an image"), b64(env.images[1]), "%%%"]})
    out = index_model.predict(query, params={"k": 2})
    errors = out.set_index("query")[models.ERROR]
    assert isinstance(errors.loc[0], str) and errors.loc[0]
    assert isinstance(errors.loc[2], str) and "base64" in errors.loc[2]
    good = out[out["query"] == 1]
    assert len(good) == 2 and good["error"].isna().all() and good.iloc[0]["image_id"] == "img1"


def test_index_model_all_bad_or_bad_params_is_a_400(env: Env, index_model) -> None:
    with pytest.raises(MlflowException) as exc:
        index_model.predict(pd.DataFrame({"image": [b64(b"\x89PNG\r\n\x1a\n broken")]}))
    assert exc.value.get_http_status_code() == 400
    with pytest.raises(MlflowException) as exc:
        index_model.predict(pd.DataFrame({"image": [b64(env.images[0])]}), params={"k": 0})
    assert exc.value.get_http_status_code() == 400 and "k must be" in exc.value.message


def test_index_model_params_filter_by_category(env: Env, index_model) -> None:
    query = pd.DataFrame({"image": [b64(env.images[0])]})
    out = index_model.predict(query, params={"k": 5, "category": "a"})
    assert len(out) == 3 and set(out["category"]) == {"a"}  # 3 of the 6 images are in "a"
    assert list(out["rank"]) == [1, 2, 3]
    assert len(index_model.predict(query, params={"k": 5})) == 5
    none = index_model.predict(query, params={"k": 5, "category": "no-such-category"})
    assert len(none) == 1 and none.iloc[0]["error"].startswith("no_results")


def test_paths_are_refused_unless_the_loader_opts_in(
    env: Env, pair, index_model, tmp_path: Path
) -> None:
    picture = tmp_path / "q.png"
    picture.write_bytes(env.images[2])
    cfg, registered = pair
    uri = f"models:/{cfg.index_name}/{registered.index.version}"
    with pytest.raises(MlflowException, match="base64"):
        index_model.predict(pd.DataFrame({"image": [str(picture)]}))
    local = mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})
    out = local.predict(pd.DataFrame({"image": [str(picture)]}), params={"k": 1})
    assert out.iloc[0]["image_id"] == "img2"


def test_extractor_model_embeds(env: Env, pair) -> None:
    cfg, registered = pair
    model = mlflow.pyfunc.load_model(f"models:/{cfg.extractor_name}/{registered.extractor.version}")
    out = model.predict(pd.DataFrame({"image": [b64(env.images[0]), b64(b"junk")]}))
    vec = np.asarray(out.iloc[0]["embedding"], dtype=np.float32)
    assert vec.ndim == 1 and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)
    assert out.iloc[1]["embedding"] is None and out.iloc[1]["error"]


# --- promotion and rollback --------------------------------------------------------------------


def test_gate_promotes_first_refuses_worse_accepts_better_and_rolls_back(env: Env, pair) -> None:
    cfg, client, base = names(), env.client(), pair[1]
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name}
    v1 = clone(env, base, cfg, 0.50)
    first = promote(client, "map_at_r", 0.0, smoke=True, **kw)  # no champion yet
    assert first.promoted, first.reason
    assert first.smoke["results"] == 3
    assert aliases(client, cfg.index_name)["champion"] == str(v1.index.version)
    assert aliases(client, cfg.extractor_name)["champion"] == str(v1.extractor.version)

    v2 = clone(env, base, cfg, 0.40)  # worse
    before = (aliases(client, cfg.index_name), aliases(client, cfg.extractor_name))
    worse = promote(client, "map_at_r", 0.0, smoke=False, **kw)
    assert not worse.promoted and "does not beat" in worse.reason
    assert worse.challenger_version == str(v2.index.version)
    assert (aliases(client, cfg.index_name), aliases(client, cfg.extractor_name)) == before

    clone(env, base, cfg, 0.50)  # equal: a tie never promotes (strict improvement)
    tie = promote(client, "map_at_r", 0.0, smoke=False, **kw)
    assert not tie.promoted and "tie" in tie.reason
    v3 = clone(env, base, cfg, 0.60)
    refused = promote(client, "map_at_r", 0.2, smoke=False, **kw)
    assert not refused.promoted  # not with a larger required improvement
    better = promote(client, "map_at_r", smoke=False, **kw)
    assert better.promoted and better.champion_version == str(v1.index.version)
    assert aliases(client, cfg.index_name)["champion"] == str(v3.index.version)
    assert aliases(client, cfg.index_name)["previous"] == str(v1.index.version)
    assert "challenger" not in aliases(client, cfg.index_name)  # decided: no longer a candidate
    assert client.get_model_version(cfg.index_name, str(v3.index.version)).tags[
        TAG_PREVIOUS_CHAMPION
    ] == str(v1.index.version)
    again = promote(client, "map_at_r", 0.0, smoke=False, **kw)
    assert not again.promoted and "challenger" in again.reason

    back = rollback(client, **kw)
    assert (back.from_version, back.to_version) == (str(v3.index.version), str(v1.index.version))
    now = aliases(client, cfg.index_name)
    assert now["champion"] == str(v1.index.version)
    assert "challenger" not in now  # the rolled-back version is not promoted again by the next gate
    assert aliases(client, cfg.extractor_name)["champion"] == str(v1.extractor.version)
    with pytest.raises(RegistryError):
        rollback(client, **kw)  # v1 had no champion before it


def test_smoke_failure_changes_nothing(env: Env, pair, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, client = names(), env.client()
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name}
    clone(env, pair[1], cfg, 0.9)

    def broken(*args, **kwargs):
        raise RuntimeError("model does not load")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", broken)
    decision = promote(client, "map_at_r", smoke=True, **kw)
    assert not decision.promoted and "smoke check failed" in decision.reason
    assert "champion" not in aliases(client, cfg.index_name)


def test_unreachable_store_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError, match="registry store failed"):
        promote(MlflowClient(tracking_uri=down, registry_uri=down), smoke=False)
    with pytest.raises(RegistryUnavailableError):
        rollback(MlflowClient(tracking_uri=down, registry_uri=down))
    assert time.perf_counter() - t0 < 30

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unusable = f"sqlite:///{blocker / 'mlflow.db'}"  # a database path under a regular file
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(unusable)
    mlflow.set_registry_uri(unusable)
    try:
        with pytest.raises(RegistryUnavailableError):
            promote(smoke=False)  # the default client is built from the current URIs
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])


def test_store_failing_mid_promotion_reverts_every_write(
    env: Env, pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, client = names(), env.client()
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name}
    clone(env, pair[1], cfg, 0.5)
    assert promote(client, smoke=False, **kw).promoted
    v2 = clone(env, pair[1], cfg, 0.6)
    before = (aliases(client, cfg.index_name), aliases(client, cfg.extractor_name))
    tags_before = client.get_model_version(cfg.index_name, str(v2.index.version)).tags

    real = client.set_registered_model_alias

    def flaky(name, alias, version):
        if name == cfg.index_name and alias == "champion":  # the last write: the commit point
            import sqlalchemy.exc

            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
        return real(name, alias, version)

    monkeypatch.setattr(client, "set_registered_model_alias", flaky)
    with pytest.raises(RegistryUnavailableError, match="reverted"):
        promote(client, smoke=False, **kw)
    monkeypatch.undo()
    assert (aliases(client, cfg.index_name), aliases(client, cfg.extractor_name)) == before
    assert client.get_model_version(cfg.index_name, str(v2.index.version)).tags == tags_before


@pytest.mark.slow  # MLflow's SQLite store waits out a 20 s busy timeout before it fails
def test_locked_sqlite_store_fails_cleanly(env: Env, pair) -> None:
    cfg, client = names(), env.client()
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name}
    clone(env, pair[1], cfg, 0.5)
    db = env.uri.removeprefix("sqlite:///")
    lock = sqlite3.connect(db, timeout=0.1)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RegistryUnavailableError):
            promote(client, smoke=False, **kw)
    finally:
        lock.rollback()
        lock.close()
    assert "champion" not in aliases(client, cfg.index_name)


# --- the steps ---------------------------------------------------------------------------------


def test_register_and_promote_steps(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps read their inputs from upstream runs, register once (a rerun reuses), promote."""
    import yaml

    from steps import promote as promote_step
    from steps import register as register_step

    monkeypatch.setenv(
        "MLFLOW_EXPERIMENT_ID", env.experiment_id
    )  # artifacts under tmp, not ./mlruns
    cfg, client = names(), env.client()
    with mlflow.start_run(run_name="extract") as extract_run:
        mlflow.log_artifacts(str(env.extractor_dir), "extractor")
    inputs = {INPUT_EXTRACT_RUN: extract_run.info.run_id, INPUT_SPLIT_RUN: "split-run"}
    with mlflow.start_run(run_name="index") as index_run:
        mlflow.set_tags(inputs)  # as steps.index records its input
        mlflow.log_artifacts(str(env.index_dir), "index")
        tuned = RankingConfig(popularity_weight=0.05)
        mlflow.log_text(yaml.safe_dump(dataclasses.asdict(tuned)), "ranking.yaml")
    with mlflow.start_run(run_name="evaluate") as evaluate_run:
        mlflow.set_tags(inputs)  # as steps.evaluate records what it measured
        mlflow.log_params({"split": "test"})
        mlflow.log_metrics({"map_at_r": 0.42, "hit_at_1": 0.9})
        per_query = pd.DataFrame({"image_id": ["img1", "img0"], "ap": [1.0, 0.5]})
        with_path = env.root / "per_query.parquet"
        per_query.to_parquet(with_path)
        mlflow.log_artifact(str(with_path))
    ids = (extract_run.info.run_id, index_run.info.run_id, evaluate_run.info.run_id)
    overrides = {
        "register.extractor_name": cfg.extractor_name,
        "register.index_name": cfg.index_name,
    }

    step_run = register_step.run(*ids, overrides=overrides)
    idx = client.get_model_version_by_alias(cfg.index_name, "challenger")
    assert float(idx.tags["metric.map_at_r"]) == 0.42 and float(idx.tags["metric.hit_at_1"]) == 0.9
    assert idx.tags["source_run_id"] == index_run.info.run_id
    assert (
        idx.tags["eval_split"] == "test" and idx.tags["evaluate_run_id"] == evaluate_run.info.run_id
    )
    assert idx.tags["test_split_hash"]
    ext = client.get_model_version_by_alias(cfg.extractor_name, "challenger")
    assert ext.tags["source_run_id"] == extract_run.info.run_id
    assert client.get_run(step_run).data.params["index_version"] == str(idx.version)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.index_name}@challenger")
    defaults = {p["name"]: p["default"] for p in model.metadata.get_params_schema().to_dict()}
    assert defaults["popularity_weight"] == 0.05  # the tuned ranking is what the model serves
    # an extract run that logged no precision embedded in fp32: tagged so, served fused
    assert idx.tags["imgsearch.extract.precision"] == ext.tags["imgsearch.extract.precision"]
    assert idx.tags["imgsearch.extract.precision"] == "fp32"
    assert model.model_config["serving_mode"] == "fused"

    register_step.run(*ids, overrides=overrides)  # a retry: no new versions
    assert len(client.search_model_versions(f"name = '{cfg.index_name}'")) == 1

    promote_run = promote_step.run(
        overrides={
            "promote.index_name": cfg.index_name,
            "promote.extractor_name": cfg.extractor_name,
        }
    )
    tags = client.get_run(promote_run).data.tags
    assert tags["promote.promoted"] == "true", tags["promote.reason"]
    assert client.get_model_version_by_alias(cfg.index_name, "champion").version == idx.version
    assert client.get_model_version_by_alias(cfg.extractor_name, "champion").version == ext.version
