"""Watermarks: what is new, atomic persistence, replay sampling and the job's decision rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from imgsearch.data import watermark as W


def _manifest(tmp_path: Path, n: int, prefix: str = "img") -> pd.DataFrame:
    rows = []
    for i in range(n):
        path = tmp_path / f"{prefix}{i}.bin"
        path.write_bytes(f"{prefix}-{i}".encode())
        rows.append(
            {
                "image_id": f"{prefix}{i}",
                "item_id": f"it{i // 2}",
                "uri": path.name,
                "path": str(path),
            }
        )
    return pd.DataFrame(rows)


def test_source_key_is_stable_and_order_free() -> None:
    a = W.source_key({"catalog_source": "folder /x", "catalog_data_root": "/x"})
    b = W.source_key({"catalog_data_root": "/x", "catalog_source": "folder /x"})
    assert a == b and len(a) == 64
    assert a != W.source_key({"catalog_source": "folder /y", "catalog_data_root": "/y"})


def test_select_new_skips_seen_ids_and_seen_bytes(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 6)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"img-0")  # the bytes of img0 under a new id
    m = pd.concat(
        [
            m,
            pd.DataFrame(
                [{"image_id": "dup", "item_id": "itX", "uri": "copy.bin", "path": str(copy)}]
            ),
        ],
        ignore_index=True,
    )
    seen_hash = hashlib.sha256(b"img-0").hexdigest()
    out = W.select_new(m, seen_ids={"img0", "img1"}, seen_hashes={seen_hash})
    assert out.n_seen == 2
    assert list(out.new["image_id"]) == ["img2", "img3", "img4", "img5"]
    assert out.new["sha256"].iloc[0] == hashlib.sha256(b"img-2").hexdigest()
    assert list(out.duplicates["image_id"]) == ["dup"]
    assert out.duplicates["reason"].iloc[0] == W.DUPLICATE_OF_SEEN
    assert out.metrics()["n_catalog"] == 7
    # a cap defers the rest, in image_id order
    capped = W.select_new(m, {"img0"}, max_new=2)
    assert list(capped.new["image_id"]) == ["dup", "img1"]
    assert len(capped.deferred) == 4
    # an unreadable file is still new (validate quarantines it with its reason)
    m.loc[5, "path"] = str(tmp_path / "missing.bin")
    assert W.select_new(m, set()).new.set_index("image_id").loc["img5", "sha256"] is None
    with pytest.raises(ValueError):
        W.select_new(m, set(), max_new=0)


def test_save_load_roundtrip_is_atomic_and_checked(tmp_path: Path) -> None:
    key = W.source_key({"catalog_source": "s"})
    empty = W.load_watermark(tmp_path, key, {"catalog_source": "s"})
    assert empty.seen == {} and empty.source == {"catalog_source": "s"}
    wm = empty.advanced({"a": "h1", "b": None}, untrained=["a"], record={"job_run_id": "r1"})
    path = W.save_watermark(wm, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    back = W.load_watermark(tmp_path, key)
    assert back.seen == {"a": "h1", "b": ""} and back.untrained == ["a"]
    assert back.history[-1]["job_run_id"] == "r1" and back.seen_hashes() == {"h1"}
    later = back.advanced({"c": "h3"}, trained=["a"])
    assert later.untrained == [] and set(later.seen) == {"a", "b", "c"}
    assert back.seen == {"a": "h1", "b": ""}  # advancing returns a new watermark

    path.write_text("{not json")
    with pytest.raises(W.WatermarkError):
        W.load_watermark(tmp_path, key)

    path.write_text(json.dumps({**wm.to_dict(), "key": "other"}))
    with pytest.raises(W.WatermarkError):
        W.load_watermark(tmp_path, key)


def test_held_images_stay_out_of_training_until_released(tmp_path: Path) -> None:
    """Images of a new domain held for review are served but neither untrained (pending) nor
    dropped; releasing them moves them to the untrained list; training on them clears them."""
    wm = W.Watermark(key="k").advanced({"a": "h1", "n1": "h2", "n2": "h3"}, untrained=["a"])
    held = wm.advanced({}, held=["n1", "n2"])
    assert held.untrained == ["a"] and held.held == ["n1", "n2"]
    back = W.Watermark.from_dict(json.loads(json.dumps(held.to_dict())))
    assert back.held == ["n1", "n2"]  # survives the JSON round trip
    still = back.advanced({"b": "h4"}, untrained=["b"])  # another wait: held stays held
    assert still.held == ["n1", "n2"] and still.untrained == ["a", "b"]
    released = still.advanced({}, released=["n1"])
    assert released.held == ["n2"] and released.untrained == ["a", "b", "n1"]
    trained = released.advanced({}, trained=["a", "b", "n1", "n2"])
    assert trained.held == [] and trained.untrained == []
    old = {k: v for k, v in wm.to_dict().items() if k != "held"}  # a watermark from before
    assert W.Watermark.from_dict(old).held == []


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = W.source_key({"catalog_source": "s"})
    W.save_watermark(W.Watermark(key=key).advanced({"a": "h"}), tmp_path)

    def boom(*_args: object, **_kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(W.os, "replace", boom)
    with pytest.raises(OSError):
        W.save_watermark(W.Watermark(key=key).advanced({"a": "h", "b": "h2"}), tmp_path)
    monkeypatch.undo()
    assert set(W.load_watermark(tmp_path, key).seen) == {"a"}
    assert len(list(tmp_path.iterdir())) == 1


def test_replay_sample_keeps_positives_and_is_seeded() -> None:
    ids = [f"i{k}" for k in range(20)]
    items = [f"t{k // 2}" for k in range(20)]
    out = W.replay_sample(ids, items, new_items={"t3"}, n_random=5, seed=1)
    assert {"i6", "i7"} <= set(out) and len(out) == 7
    assert out == W.replay_sample(ids, items, {"t3"}, 5, seed=1)
    assert out != W.replay_sample(ids, items, {"t3"}, 5, seed=2)
    assert W.replay_sample(ids, items, {"t3"}, 0, same_items=False) == []
    assert len(W.replay_sample(ids, items, set(), 100)) == 20
    with pytest.raises(ValueError):
        W.replay_sample(ids, items[:3], set(), 1)


def test_decide() -> None:
    assert W.decide(True, 0, 0, 500) == ("skip", "no new data")
    assert W.decide(True, 10, 0, 500)[0] == "improve"
    assert W.decide(False, 500, 0, 500)[0] == "improve"
    assert W.decide(False, 400, 100, 500)[0] == "improve"  # pending images count
    decision, reason = W.decide(False, 499, 0, 500)
    assert decision == "wait" and "499 new images < min_new_images 500" in reason


def test_decide_by_kind_of_drift() -> None:
    # a shift among things we know: fine-tune on it, as any drift
    decision, reason = W.decide(True, 10, 0, 500, kind="shift", novel_share=0.1)
    assert decision == "improve" and reason.startswith("drift detected")
    # a new domain: held for review by default, whatever the counts; served, not trained on
    for n_new in (10, 5000):
        decision, reason = W.decide(True, n_new, 0, 500, kind="novel", novel_share=0.87)
        assert decision == "wait"
        assert reason.startswith("new domain: 87% of new images are far from everything")
        assert "held for review: served, not trained on until improve.release_held" in reason
    # on_novel: improve keeps the old behaviour
    decision, reason = W.decide(
        True, 10, 0, 500, kind="novel", novel_share=0.87, on_novel="improve"
    )
    assert decision == "improve" and reason.startswith("new domain detected")
    # no drift: the kind does not matter, nor without new data
    assert W.decide(False, 10, 0, 500, kind="none")[0] == "wait"
    assert W.decide(True, 0, 0, 500, kind="novel") == ("skip", "no new data")
    with pytest.raises(ValueError, match="on_novel"):
        W.decide(True, 10, 0, 500, on_novel="ask")


def test_the_job_refits_the_attribute_heads_and_a_failure_is_only_reported(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a promoted fine-tuned challenger the job fits the attribute heads on its extractor
    (``improve.refit_attributes``); a registry error there is written into the reason, and the
    job goes on."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from monitoring import improve_challenger, improve_job
    from monitoring.improve_summary import JobState
    from registry.promote import PromoteConfig
    from registry.register import RegisterConfig

    calls: list[tuple[str, str, dict[str, object]]] = []

    def fit(extract: str, split: str, **kw: object) -> str:
        calls.append((extract, split, kw))
        return "heads-run"

    monkeypatch.setattr(improve_challenger.attributes_step, "run_if_configured", fit)
    job = improve_job.Job(
        improve_job.ImproveConfig(), PromoteConfig(), RegisterConfig(), "ci", {"k": 1},
        MlflowClient(), JobState(),
    )  # fmt: skip
    # an experiment of this store: another test may have left the fluent API on another store's
    experiment = MlflowClient().create_experiment("refit")
    with mlflow.start_run(experiment_id=experiment) as parent:
        job.refit_attributes("extract-run", "combined-run")
        assert calls == [("extract-run", "combined-run", {"overrides": {"k": 1}, "profile": "ci"})]
        assert job.state.runs["attributes"] == "heads-run"
        assert job.state.reason == "; attribute heads refitted on the new champion"

        def down(*_a: object, **_k: object) -> str:
            raise MlflowException("registry down")

        monkeypatch.setattr(improve_challenger.attributes_step, "run_if_configured", down)
        job.refit_attributes("extract-run", "combined-run")
    assert "attribute heads not refitted (MlflowException: registry down)" in job.state.reason
    tags = mlflow.get_run(parent.info.run_id).data.tags
    assert tags["imgsearch.run.attributes"] == "heads-run"
