"""Online A/B of two rankings by team-draft interleaving, judged by votes, with a sign test.

Team-draft interleaving (Radlinski, Kurup & Joachims, CIKM 2008): the two rankings take turns
like captains picking teams; the side with fewer picks so far picks next (a coin decides a tie),
taking its best result not already shown. Each shown result remembers its team. For one
impression, the side whose results got more up votes wins; equal counts are a tie (and are left
out of the test). Over many impressions a two-sided sign test (a binomial test of the wins
against p = 1/2, scipy's ``binomtest``) says whether one side is preferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

A, B = "A", "B"


def team_draft(
    ranking_a: Sequence[str], ranking_b: Sequence[str], k: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """The interleaved list (at most ``k`` ids, no repeats) and the team of each position."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    shown: list[str] = []
    teams: list[str] = []
    taken: set[str] = set()
    picks = {A: 0, B: 0}
    lists = {A: list(ranking_a), B: list(ranking_b)}
    cursor = {A: 0, B: 0}

    def next_of(side: str) -> str | None:
        items = lists[side]
        while cursor[side] < len(items) and items[cursor[side]] in taken:
            cursor[side] += 1
        return items[cursor[side]] if cursor[side] < len(items) else None

    while len(shown) < k:
        if picks[A] < picks[B] or (picks[A] == picks[B] and rng.random() < 0.5):
            order = (A, B)
        else:
            order = (B, A)
        side, item = order[0], next_of(order[0])
        if item is None:  # that side has nothing new left: the other one picks
            side, item = order[1], next_of(order[1])
        if item is None:  # both lists exhausted
            break
        shown.append(item)
        teams.append(side)
        taken.add(item)
        picks[side] += 1
    return shown, teams


def winner(teams: Sequence[str], up_positions: Sequence[int]) -> str | None:
    """``A`` / ``B`` by the up votes on each team's results (0-based positions), None on a tie."""
    a = sum(1 for p in up_positions if teams[p] == A)
    b = sum(1 for p in up_positions if teams[p] == B)
    return A if a > b else B if b > a else None


@dataclass(frozen=True)
class ABResult:
    wins_a: int
    wins_b: int
    ties: int
    p_value: float
    alpha: float

    @property
    def winner(self) -> str | None:
        """The preferred side when the sign test rejects "no preference" at ``alpha``."""
        if self.p_value >= self.alpha or self.wins_a == self.wins_b:
            return None
        return A if self.wins_a > self.wins_b else B


def sign_test(outcomes: Sequence[str | None], alpha: float = 0.05) -> ABResult:
    """Two-sided sign test over impression outcomes (``A``, ``B`` or None for a tie)."""
    from scipy.stats import binomtest

    wins_a = sum(1 for o in outcomes if o == A)
    wins_b = sum(1 for o in outcomes if o == B)
    ties = len(outcomes) - wins_a - wins_b
    n = wins_a + wins_b
    p = float(binomtest(wins_a, n, 0.5).pvalue) if n else 1.0
    return ABResult(wins_a, wins_b, ties, p, alpha)
