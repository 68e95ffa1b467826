"""Team-draft interleaving: fair (an A/A run finds no winner), sensitive (a clearly better
ranking wins), and a well-formed merged list."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.search.interleave import A, B, sign_test, team_draft, winner


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
