"""steps.artifacts: a local store's artifacts are read in place (MLflow's own download copies
them into a new temporary folder on every call and never removes it); other URIs land in one
download folder that clear_downloads empties."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest

from steps import artifacts


@pytest.fixture()
def run_with_artifact(tmp_path: Path) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("artifacts")
    (tmp_path / "a.txt").write_text("hello")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "a.txt"), "things")
    return run.info.run_id


def test_local_store_artifacts_are_read_in_place_without_a_temporary_copy(
    run_with_artifact: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # what MLflow does on its own: a fresh copy per call (the leak this module exists for)
    mlflow.artifacts.download_artifacts(run_id=run_with_artifact, artifact_path="things/a.txt")
    leaked = len(list(scratch.iterdir()))
    assert leaked == 1
    for _ in range(3):
        path = artifacts.artifact_path(run_with_artifact, "things/a.txt")
        assert path.read_text() == "hello"
    root = mlflow.get_run(run_with_artifact).info.artifact_uri
    assert str(path).startswith(str(artifacts._local_dir(root)))
    assert len(list(scratch.iterdir())) == leaked  # nothing new in the temporary folder
    folder = artifacts.local_artifact(f"runs:/{run_with_artifact}/things")
    assert (folder / "a.txt").is_file()


def test_other_uris_download_into_one_folder_that_clear_downloads_removes(
    run_with_artifact: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "in_place", lambda uri: None)  # as with a remote store
    artifacts.clear_downloads()
    first = artifacts.artifact_path(run_with_artifact, "things/a.txt")
    second = artifacts.artifact_path(run_with_artifact, "things/a.txt")
    assert first.read_text() == second.read_text() == "hello"
    folder = artifacts._download_dir()
    assert first.is_relative_to(folder) and second.is_relative_to(folder)
    artifacts.clear_downloads()
    assert not folder.exists() and not first.exists()


def test_a_missing_artifact_is_an_error_not_an_empty_path(run_with_artifact: str) -> None:
    with pytest.raises(Exception, match="nope|not found|No such|does not exist"):
        artifacts.artifact_path(run_with_artifact, "nope.txt")


def test_a_local_path_is_returned_as_it_is(tmp_path: Path) -> None:
    assert artifacts.local_artifact(str(tmp_path)) == tmp_path
    assert artifacts.local_artifact(tmp_path.as_uri()) == tmp_path
