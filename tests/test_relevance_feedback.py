"""Rocchio relevance feedback: against a naive reference, the direction it moves the query, its
refusals; and the served index model's ``liked`` / ``disliked`` params."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from imgsearch.errors import ConfigError
from imgsearch.search.relevance_feedback import RocchioConfig, rocchio
from registry.integrity import load_verified
from registry.params import DISLIKED, LIKED, SESSION
from registry.register import INDEX_MODEL
from tests.search_env import SearchEnv, get_env, tracking


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive(q: list[float], liked: list[list[float]], disliked: list[list[float]]) -> list[float]:
    """Rocchio written out element by element, the textbook weights."""
    out = []
    for d in range(len(q)):
        pos = sum(v[d] for v in liked) / len(liked) if liked else 0.0
        neg = sum(v[d] for v in disliked) / len(disliked) if disliked else 0.0
        out.append(1.0 * q[d] + 0.75 * pos - 0.15 * neg)
    norm = sum(x * x for x in out) ** 0.5
    return [x / norm for x in out]


@pytest.mark.parametrize(("n_liked", "n_disliked"), [(3, 2), (1, 0), (0, 4), (0, 0)])
def test_rocchio_matches_a_naive_reference(n_liked: int, n_disliked: int) -> None:
    rng = np.random.default_rng(n_liked * 10 + n_disliked)
    q, liked, disliked = _unit(rng, 16), _unit(rng, n_liked, 16), _unit(rng, n_disliked, 16)
    got = rocchio(q, liked, disliked)
    want = _naive(q.tolist(), liked.tolist(), disliked.tolist())
    assert got.dtype == np.float32 and got.shape == (16,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)


def test_rocchio_moves_toward_liked_and_away_from_disliked() -> None:
    rng = np.random.default_rng(0)
    q, liked, disliked = _unit(rng, 2, 32), _unit(rng, 3, 32), _unit(rng, 3, 32)
    moved = rocchio(q, liked, disliked)  # (M, D): each query row moved
    assert moved.shape == (2, 32)
    for before, after in zip(q, moved, strict=True):
        assert (liked @ after).mean() > (liked @ before).mean()
        assert (disliked @ after).mean() < (disliked @ before).mean()
    # only dislikes, with a strong gamma: the query turns away from them
    away = rocchio(q[0], None, disliked, RocchioConfig(gamma=1.0))
    assert (disliked @ away).mean() < (disliked @ q[0]).mean()


def test_rocchio_refusals() -> None:
    q = np.array([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="liked"):
        rocchio(q, np.ones((2, 4)))
    with pytest.raises(ValueError, match="zero"):
        rocchio(q, None, q[None, :], RocchioConfig(alpha=1.0, gamma=1.0))
    with pytest.raises(ConfigError, match="beta"):
        RocchioConfig(beta=-0.1)


# --- the served model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    return get_env(tmp_path_factory)


@pytest.fixture(scope="module")
def model(env: SearchEnv):  # type: ignore[no-untyped-def]
    with tracking(env.uri):
        return load_verified(f"models:/{INDEX_MODEL}/{env.pair.index.version}")


def _ask(model, env: SearchEnv, **params: object) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame({"image": [base64.b64encode(env.images[0]).decode()]})
    return model.predict(frame, params={"k": 6, **params})


def test_served_model_declares_and_applies_feedback(model, env: SearchEnv) -> None:  # type: ignore[no-untyped-def]
    declared = {p.name for p in model.metadata.get_params_schema().params}
    assert {LIKED, DISLIKED, SESSION} <= declared
    plain = _ask(model, env)
    assert plain["image_id"].tolist()[0] == "img0" and len(plain) == 6
    refined = _ask(model, env, liked="img4", disliked="img1,img2")
    ids = refined["image_id"].tolist()
    assert "img1" not in ids and "img2" not in ids and len(ids) == 4
    # img4 moved up (or stayed first among the rest) relative to the plain ranking
    plain_rest = [i for i in plain["image_id"] if i not in ("img1", "img2")]
    assert ids.index("img4") <= plain_rest.index("img4")
    sim = refined.set_index("image_id")["similarity"].astype(float)
    assert sim["img4"] > plain.set_index("image_id")["similarity"].astype(float)["img4"]


def test_served_model_refuses_bad_feedback(model, env: SearchEnv) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MlflowException, match="not in the index"):
        _ask(model, env, liked="no-such-image")
    with pytest.raises(MlflowException, match="both liked and disliked"):
        _ask(model, env, liked="img1", disliked="img1")
