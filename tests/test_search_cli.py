"""``python -m registry.search``: queries the champion in-process, prints ranked results, reports
a bad query file with its reason and still answers the others."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch import cli
from imgsearch.errors import ImageRejected
from registry import search as search_mod
from registry.search import SearchConfig, load_search_config, read_query
from tests.search_env import SearchEnv, get_env, tracking

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    e = get_env(tmp_path_factory)
    with tracking(e.uri):
        yield e


def test_cli_json_output(env: SearchEnv, capsys: pytest.CaptureFixture[str]) -> None:
    code = search_mod.main([str(env.paths[3]), "--k", "3", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["image_id"] == "img3" and rows[0]["item_name"] == "thing 1"
    assert rows[0]["file"] == str(env.paths[3])
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert f"imgsearch-index v{env.pair.index.version}" in err


def test_cli_filters_and_bad_files(
    env: SearchEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    args = [str(text), str(env.paths[0]), str(empty), str(tmp_path / "missing.png")]
    code = search_mod.main([*args, "--category", "dogs", "--exclude-nsfw", "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 1  # some queries rejected, the rest answered
    assert "notes.jpg: rejected: not_an_image" in err
    assert "empty.png: rejected: empty_file" in err
    assert "missing.png: unreadable" in err
    lines = out.strip().splitlines()
    assert lines[0].startswith("query,file,rank,image_id")
    assert len(lines) == 2 and ",img4," in lines[1]  # dogs = img4, img5; img5 is NSFW

    assert search_mod.main([str(text)]) == 2  # nothing usable
    assert "no usable query image" in capsys.readouterr().err


def test_cli_unknown_alias_fails_cleanly(
    env: SearchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search_mod.main([str(env.paths[0]), "--alias", "nobody"]) == 2
    assert "search failed" in capsys.readouterr().err


def test_read_query_limits(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as info:
        read_query(b"\x89PNG" + b"\0" * 100, max_bytes=50)
    assert info.value.reason == "file_too_large"
    with pytest.raises(ImageRejected) as info:
        read_query(b"")
    assert info.value.reason == "empty_file"


def test_config_keys_match_the_dataclass() -> None:
    cfg = load_search_config()
    assert cfg == SearchConfig(**vars(cfg))
    assert cfg.index_name == "imgsearch-index" and cfg.alias == "champion"


@pytest.mark.slow  # a fresh interpreter importing MLflow: ~10 s on a busy machine
def test_module_runs_as_a_script() -> None:
    """``python -m registry.search`` from the repository root (a subprocess: the real entry)."""
    proc = subprocess.run(
        [sys.executable, "-m", "registry.search", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--popularity-weight" in proc.stdout


def test_imgsearch_command_dispatches_without_importing_mlflow(
    env: SearchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["search", str(env.paths[1]), "--k", "1", "--format", "csv"]) == 0
    assert ",img1," in capsys.readouterr().out
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    probe = "import sys, imgsearch.cli; assert 'mlflow' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the console script from any directory ------------------------------------------------------


def _console() -> list[str]:
    exe = Path(sys.executable).with_name("imgsearch")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "imgsearch.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    drop = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PYTHONPATH", cli.PROJECT_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_find_project_from_another_directory(tmp_path: Path) -> None:
    """An editable install finds its checkout from anywhere; the store defaults to its DB."""
    assert cli.find_project(env={}, cwd=tmp_path) == ROOT
    assert cli.default_tracking_uri(ROOT) == f"sqlite:///{ROOT / 'mlflow.db'}"
    env: dict[str, str] = {}
    cli.prepare(ROOT, env)
    assert env == {"MLFLOW_TRACKING_URI": f"sqlite:///{ROOT / 'mlflow.db'}"}
    kept = {"MLFLOW_TRACKING_URI": "http://tracking:5000"}
    cli.prepare(ROOT, kept)
    assert kept == {"MLFLOW_TRACKING_URI": "http://tracking:5000"}  # an explicit URI wins


def test_a_folder_that_is_not_the_project_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cli.ProjectNotFound, match="not an imgsearch checkout"):
        cli.find_project(env={cli.PROJECT_ENV: str(tmp_path)})
    proc = subprocess.run(
        [*_console(), "search", "query.png"],
        cwd=tmp_path,
        env=_clean_env(**{cli.PROJECT_ENV: str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "not an imgsearch checkout" in proc.stderr and "IMGSEARCH_PROJECT" in proc.stderr


def test_console_script_searches_from_any_directory(env: SearchEnv, tmp_path: Path) -> None:
    """``imgsearch search`` run from a temporary directory, with ``MLFLOW_TRACKING_URI`` unset:
    the project (here a copy that links to this checkout's code) is found, ``registry`` imported
    from it and its ``mlflow.db`` used as the store."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("registry", "configs"):
        (project / name).symlink_to(ROOT / name, target_is_directory=True)
    shutil.copyfile(env.uri.removeprefix("sqlite:///"), project / "mlflow.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [*_console(), "search", str(env.paths[1]), "--k", "1", "--format", "csv"],
        cwd=elsewhere,
        env=_clean_env(**{cli.PROJECT_ENV: str(project)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ",img1," in proc.stdout
    assert f"imgsearch-index v{env.pair.index.version}" in proc.stderr


def _register_heads(env: SearchEnv, tmp_path: Path) -> str:
    """``imgsearch-attributes@champion`` fitted on the six gallery images with the served
    extractor (category cats/dogs, item_name thing 0..2); returns its registry version."""
    import mlflow

    from imgsearch.data.imageio import open_rgb
    from imgsearch.embed.style import image_features
    from imgsearch.models.attribute_heads import AttributeHead, HeadConfig, head_input, save_heads
    from imgsearch.models.backbones import fingerprint, load_extractor
    from registry.attributes_model import log_attributes_model

    ext_dir = env.root / "extractor"
    ext = load_extractor(ext_dir)
    feats = image_features(ext, [open_rgb(b) for b in env.images], ["embedding"])
    x = head_input(feats, ["embedding"])
    heads = {
        name: AttributeHead(name, HeadConfig(name)).fit(x, env.meta[name])
        for name in ("category", "item_name")
    }
    heads_dir = save_heads(
        heads,
        tmp_path / "attributes",
        {"extractor_fingerprint": fingerprint(ext), "gram_blocks": [], "feature_kinds": []},
    )
    exp = mlflow.get_experiment_by_name("search-tests")
    assert exp is not None
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="attributes") as run:
        version = log_attributes_model(
            heads_dir,
            ext_dir,
            extractor_version=env.pair.extractor,
            source_run_id=run.info.run_id,
            alias="champion",
        )
    return str(version.version)


def test_cli_prints_the_query_attributes_only_from_heads_of_the_served_extractor(
    env: SearchEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No ``imgsearch-attributes``: search answers as before, no attributes line.
    ``imgsearch-attributes@champion`` trained on the served extractor version: each query's top
    label and probability per attribute on stderr. Heads of another extractor version: refused
    with the reason, and search still answers."""
    from mlflow import MlflowClient

    from registry.attributes_model import ATTRIBUTES_MODEL
    from registry.tags import TAG_EXTRACTOR_VERSION

    query = [str(env.paths[0]), str(env.paths[4]), "--k", "2", "--format", "csv"]
    assert search_mod.main(query) == 0
    out, err = capsys.readouterr()
    assert ",img0," in out and ",img4," in out
    assert "attributes" not in err and "predicted" not in err

    client = MlflowClient()
    try:
        version = _register_heads(env, tmp_path)
        served = search_mod.load_served(load_search_config(None, {}))
        assert served.extractor_version == str(env.pair.extractor.version)
        assert served.attributes.model is not None
        assert served.label.endswith(f", {ATTRIBUTES_MODEL} v{version}")

        assert search_mod.main(query) == 0
        out, err = capsys.readouterr()
        assert ",img0," in out and ",img4," in out  # the answer itself is unchanged
        lines = {ln.split(": predicted ")[0]: ln for ln in err.splitlines() if "predicted" in ln}
        assert set(lines) == {f"# {env.paths[0]}", f"# {env.paths[4]}"}, err
        pattern = r": predicted category {} \(\d\.\d\d\) · item_name thing {} \(\d\.\d\d\)$"
        assert re.search(pattern.format("cats", 0), lines[f"# {env.paths[0]}"]), err
        assert re.search(pattern.format("dogs", 2), lines[f"# {env.paths[4]}"]), err

        client.set_model_version_tag(ATTRIBUTES_MODEL, version, TAG_EXTRACTOR_VERSION, "99")
        assert search_mod.main(query) == 0
        out, err = capsys.readouterr()
        assert ",img0," in out and "predicted" not in err
        assert (
            f"# attributes: {ATTRIBUTES_MODEL} v{version} was trained on extractor v99, the served"
            f" index on v{env.pair.extractor.version}: not used (re-run the attributes step)"
        ) in err
    finally:  # the search env is shared by the session's other tests
        try:
            client.delete_registered_model(ATTRIBUTES_MODEL)
        except Exception:  # noqa: BLE001 - nothing was registered
            pass
