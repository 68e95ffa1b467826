"""Team-draft interleaving: fair (an A/A run finds no winner), sensitive (a clearly better
ranking wins), and a well-formed merged list; the served interleaved tables and the daemon's
report (per-impression outcomes from the votes, the sign test, the minimum of impressions)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from imgsearch.search.interleave import (
    ARM_A,
    ARM_B,
    NO_VOTES,
    TEAM,
    TIE,
    A,
    ABConfig,
    B,
    ab_reports,
    impression_outcomes,
    interleave_hits,
    report_markdown,
    rng_for,
    sign_test,
    team_draft,
    winner,
)


def test_team_draft_merges_without_repeats_and_alternates() -> None:
    rng = np.random.default_rng(0)
    shown, teams = team_draft(["a", "b", "c", "d"], ["b", "e", "a", "f"], 6, rng)
    assert len(shown) == len(set(shown)) == 6 and set(shown) <= set("abcdef")
    assert abs(teams.count(A) - teams.count(B)) <= 1
    shown, teams = team_draft(["a"], ["a", "b"], 5, rng)  # lists run out
    assert shown == ["a", "b"]
    with pytest.raises(ValueError):
        team_draft(["a"], ["b"], 0, rng)


def _clicks(rng: np.random.Generator, shown: list[str], good: set[str]) -> list[int]:
    """Position-biased users: examine position p with 1/(p+1), up-vote good results."""
    return [p for p, i in enumerate(shown) if rng.random() < 1 / (p + 1) and i in good]


def test_an_aa_run_has_no_significant_winner() -> None:
    rng = np.random.default_rng(1)
    outcomes, first_slot = [], []
    for _ in range(600):
        ranking = [f"i{j}" for j in rng.permutation(20)]
        good = {f"i{j}" for j in range(8)}
        shown, teams = team_draft(ranking, ranking, 10, rng)
        first_slot.append(teams[0])
        outcomes.append(winner(teams, _clicks(rng, shown, good)))
    result = sign_test(outcomes)
    assert result.winner is None and result.p_value > 0.05
    assert 0.4 < first_slot.count(A) / len(first_slot) < 0.6  # the coin is fair


def test_a_better_ranking_wins() -> None:
    rng = np.random.default_rng(2)
    outcomes = []
    for _ in range(300):
        good = [f"g{j}" for j in range(5)]
        bad = [f"b{j}" for j in range(15)]
        better = good + bad  # relevant results first
        worse = [*bad[:5], *good, *bad[5:]]
        shown, teams = team_draft(worse, better, 10, rng)
        outcomes.append(winner(teams, _clicks(rng, shown, set(good))))
    result = sign_test(outcomes)
    assert result.winner == B and result.p_value < 0.01 and result.wins_b > result.wins_a


# --- the served lists and the daemon's report ------------------------------------------------------


def _hits(order: list[str], query: int = 0) -> pd.DataFrame:
    """One query's ranked result table, as the index model (or a reranker) answers."""
    return pd.DataFrame(
        {
            "query": query,
            "rank": np.arange(1, len(order) + 1, dtype=float),
            "image_id": order,
            "similarity": np.linspace(0.9, 0.1, len(order)),
        }
    )


def _simulate(
    n: int, seed: int, order_b: Callable[[list[str]], list[str]], k: int = 6
) -> pd.DataFrame:
    """``n`` A/B impressions of one experiment served by :func:`interleave_hits` and voted on by
    position-biased users (examine position p with 1/(p+1); up on a relevant result, down on an
    irrelevant one a third of the time); rows as the impressions table joined with the votes."""
    rng = np.random.default_rng(seed)
    lists = [[f"q{q}i{j}" for j in rng.permutation(12)] for q in range(n)]
    relevant = {i for items in lists for i in [*items[:6:2], *items[6:9]]}  # spread out
    ranked_a = pd.concat([_hits(items, q) for q, items in enumerate(lists)], ignore_index=True)
    ranked_b = pd.concat([_hits(order_b(items), q) for q, items in enumerate(lists)])
    shown = interleave_hits(ranked_a, ranked_b.reset_index(drop=True), k, rng)
    seen = rng.random(len(shown)) < 1 / shown["rank"].to_numpy()
    good = shown["image_id"].isin(relevant).to_numpy()
    down = rng.random(len(shown)) < 1 / 3
    vote = np.where(seen & good, 1, np.where(seen & ~good & down, -1, 0))
    return pd.DataFrame(
        {
            "query_id": "q" + shown["query"].astype(str),
            "rank": shown["rank"].astype(int),
            "result_image_id": shown["image_id"],
            TEAM: shown[TEAM],
            "vote": vote,
            "index_version": "3",
            ARM_A: "first_stage",
            ARM_B: "imgsearch-reranker v2",
        }
    )


def test_served_aa_from_simulated_votes_has_no_significant_winner() -> None:
    """Both arms the same ranking, votes that ignore the teams: the report names no winner,
    and over many such experiments the false-positive rate stays near alpha."""
    data = _simulate(500, seed=3, order_b=lambda items: list(items))
    [report] = ab_reports(data, alpha=0.05, min_impressions=100)
    assert report.impressions == 500 and report.voted >= 100 and report.enough
    assert report.winner is None and report.result.p_value > 0.05
    assert report.verdict == "no significant winner"
    assert report.experiment == {
        "index_version": "3",
        ARM_A: "first_stage",
        ARM_B: "imgsearch-reranker v2",
    }

    rng = np.random.default_rng(4)
    significant = 0
    for _ in range(300):
        outcomes = []
        for _ in range(60):
            ranking = [f"i{j}" for j in rng.permutation(12)]
            shown, teams = team_draft(ranking, ranking, 6, rng)
            ups = _clicks(rng, shown, set(ranking[:4]))
            outcomes.append(winner(teams, ups))
        significant += sign_test(outcomes).winner is not None
    assert significant / 300 <= 0.08  # the binomial test is conservative: about alpha or less


def test_a_planted_preference_names_b_and_waits_for_enough_impressions() -> None:
    """B ranks the relevant results first and the votes follow relevance: B wins, but only
    once ``min_impressions`` voted impressions were seen."""

    def relevant_first(items: list[str]) -> list[str]:
        relevant = [*items[:6:2], *items[6:9]]
        return relevant + [i for i in items if i not in relevant]

    data = _simulate(150, seed=5, order_b=relevant_first)
    [report] = ab_reports(data, alpha=0.05, min_impressions=50)
    assert report.winner == B and report.result.p_value < 0.01
    assert report.verdict == "B wins (imgsearch-reranker v2)"
    assert report.to_dict()["wins_b"] > report.to_dict()["wins_a"]

    [early] = ab_reports(data, alpha=0.05, min_impressions=report.voted + 1)
    assert early.winner is None and early.verdict.startswith("not enough impressions")
    assert early.result.p_value == report.result.p_value
    md = report_markdown([report])
    assert "B wins (imgsearch-reranker v2)" in md and "| 3 | first_stage |" in md


def test_outcomes_per_impression_and_experiments_apart() -> None:
    base = {"index_version": "3", ARM_A: "x", ARM_B: "y"}
    rows = [
        # q1: A has one up, B one up and one down -> A
        ("q1", 1, A, 1), ("q1", 2, B, 1), ("q1", 3, B, -1),
        ("q2", 1, B, 0), ("q2", 2, A, 0),  # nobody voted
        ("q3", 1, A, 1), ("q3", 2, B, 1),  # tie
        ("q4", 1, None, 1),  # not an A/B list: ignored
    ]  # fmt: skip
    data = pd.DataFrame(
        [{"query_id": q, "rank": r, TEAM: t, "vote": v, **base} for q, r, t, v in rows]
    )
    data = pd.concat([data, data.head(1).assign(query_id="q5", **{ARM_B: "z"})])
    out = impression_outcomes(data).set_index("query_id")
    assert out["outcome"].to_dict() == {"q1": A, "q2": NO_VOTES, "q3": TIE, "q5": A}
    assert out.loc["q1", ["up_a", "down_a", "up_b", "down_b"]].tolist() == [1, 0, 1, 1]
    latest, older = ab_reports(data, min_impressions=1)
    assert latest.experiment[ARM_B] == "z" and latest.impressions == 1
    assert (older.impressions, older.voted, older.result.ties) == (3, 2, 1)
    assert ab_reports(data.assign(**{TEAM: None})) == []
    with pytest.raises(ValueError, match="vote"):
        impression_outcomes(data.drop(columns="vote"))


def test_interleave_hits_keeps_error_rows_and_is_seeded_by_its_key() -> None:
    a = pd.concat(
        [_hits(list("abcdef")), pd.DataFrame({"query": [1], "rank": [np.nan], "error": ["bad"]})],
        ignore_index=True,
    )
    b = a.copy()
    b.loc[:5, "image_id"] = list("fedcba")
    shown = interleave_hits(a, b, 4, rng_for("session:query"))
    answered = shown[shown["rank"].notna()]
    assert answered["rank"].tolist() == [1, 2, 3, 4] and answered[TEAM].isin([A, B]).all()
    assert set(answered["image_id"]) <= set("abcdef") and answered["image_id"].is_unique
    assert shown["error"].dropna().tolist() == ["bad"]
    again = interleave_hits(a, b, 4, rng_for("session:query"))
    pd.testing.assert_frame_equal(shown, again)  # a page re-run shows the same list
    teams = {tuple(interleave_hits(a, b, 4, rng_for(f"s{i}:q"))[TEAM][:4]) for i in range(20)}
    assert len(teams) > 1  # another session, another coin


def test_winner_counts_down_votes_against_a_side_and_config_is_checked() -> None:
    assert winner([A, B, A], [0, 1]) is None
    assert winner([A, B, A], [0, 1], down_positions=[2]) == B
    assert ABConfig().enabled is False
    with pytest.raises(ValueError, match="alpha"):
        ABConfig(alpha=1.5)
    with pytest.raises(ValueError, match="min_impressions"):
        ABConfig(min_impressions=0)
