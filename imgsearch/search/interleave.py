"""Online A/B of two rankings by team-draft interleaving, judged by votes, with a sign test.

Team-draft interleaving (Radlinski, Kurup & Joachims, CIKM 2008): the two rankings take turns
like captains picking teams; the side with fewer picks so far picks next (a coin decides a tie),
taking its best result not already shown. Each shown result remembers its team. For one
impression, each side's credit is the up votes on its results minus the down votes; the side with
more credit wins, equal credit is a tie (left out of the test), and an impression nobody voted on
judges nothing. Over many impressions a two-sided sign test (a binomial test of the wins against
p = 1/2, scipy's ``binomtest``) says whether one side is preferred.

Serving (:func:`interleave_hits`) turns two ranked result tables into the interleaved one, with
each row's team in :data:`TEAM`; the report (:func:`ab_reports`) takes the stored impressions of
such lists joined with their votes (one row per shown result, with ``vote`` +1 / -1 / 0) and gives,
per pair of arms, the wins of each side, the ties, the p-value and the verdict, which names a
winner only once ``min_impressions`` voted impressions were seen and ``p < alpha``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

A, B = "A", "B"
TIE, NO_VOTES = "tie", "no_votes"
#: impression columns: the team of a shown result, and which ranking each arm was
TEAM, ARM_A, ARM_B = "ab_team", "ab_arm_a", "ab_arm_b"
#: what identifies one experiment among stored impressions (the arms are per index version)
EXPERIMENT = ("index_version", ARM_A, ARM_B)


@dataclass(frozen=True)
class ABConfig:
    """``search.ab`` (``configs/search.yaml``): the online A/B of the served ranking (arm A) and
    a challenger (arm B); ``min_impressions`` voted impressions before a verdict, at ``alpha``."""

    enabled: bool = False
    challenger: str = "challenger"  # the alias of arm B's reranker
    min_impressions: int = 200
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if int(self.min_impressions) < 1:
            raise ValueError(f"ab.min_impressions must be >= 1, got {self.min_impressions}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"ab.alpha must be in (0, 1), got {self.alpha}")


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


def winner(
    teams: Sequence[str], up_positions: Sequence[int], down_positions: Sequence[int] = ()
) -> str | None:
    """``A`` / ``B`` by each team's up votes minus its down votes (0-based positions), None on
    a tie."""

    def credit(side: str) -> int:
        ups = sum(1 for p in up_positions if teams[p] == side)
        return ups - sum(1 for p in down_positions if teams[p] == side)

    a, b = credit(A), credit(B)
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


# --- serving: two ranked tables -> the interleaved one -------------------------------------------


def rng_for(key: str | None) -> np.random.Generator:
    """The coin of one interleaving: seeded by ``key`` (the same list again for the same key,
    e.g. a page re-run for the same session and query), fresh entropy without one."""
    if key is None:
        return np.random.default_rng()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def interleave_hits(
    hits_a: pd.DataFrame, hits_b: pd.DataFrame, k: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Team-draft interleave two result tables (``query``, ``rank``, ``image_id``, ...: one row
    per (query, rank), the same candidates ordered by each arm) into at most ``k`` rows per
    query, ranked 1..k, each row taken from the arm that picked it, its team in :data:`TEAM`.
    Rows without a rank (a query's error row) are kept as ``hits_a`` has them."""
    if "query" not in hits_a.columns:
        hits_a, hits_b = hits_a.assign(query=0), hits_b.assign(query=0)
    sides = {
        side: hits[hits["rank"].notna()].sort_values(["query", "rank"], kind="stable")
        for side, hits in ((A, hits_a), (B, hits_b))
    }
    ids = {side: rows["image_id"].astype(str).to_numpy() for side, rows in sides.items()}
    groups = {side: rows.groupby("query", sort=True).indices for side, rows in sides.items()}
    picked: dict[str, list[int]] = {A: [], B: []}  # row positions in sides[...]
    order: dict[str, list[tuple[int, int]]] = {A: [], B: []}  # (query's turn, rank)
    empty = np.zeros(0, dtype=np.int64)
    for turn, query in enumerate(groups[A]):
        at = {side: groups[side].get(query, empty) for side in (A, B)}
        shown, teams = team_draft(list(ids[A][at[A]]), list(ids[B][at[B]]), k, rng)
        first: dict[str, dict[str, int]] = {A: {}, B: {}}
        for side in (A, B):
            for p in reversed(at[side]):
                first[side][str(ids[side][p])] = int(p)
        for rank, (item, side) in enumerate(zip(shown, teams, strict=True), start=1):
            picked[side].append(first[side][item])
            order[side].append((turn, rank))
    parts = [
        sides[side]
        .iloc[picked[side]]
        .assign(
            rank=[r for _, r in order[side]],
            _turn=[t for t, _ in order[side]],
            **{TEAM: side},
        )
        for side in (A, B)
    ]
    out = pd.concat(parts, ignore_index=True).sort_values(["_turn", "rank"], kind="stable")
    out = out.drop(columns="_turn")
    rest = hits_a[hits_a["rank"].isna()]
    if not rest.empty:
        out = pd.concat([out, rest], ignore_index=True)
    return out.reset_index(drop=True)


# --- the report: stored impressions + their votes -> wins, ties, sign test ---------------------


def impression_outcomes(labelled: pd.DataFrame) -> pd.DataFrame:
    """One row per A/B impression (``query_id``) of ``labelled`` (impression rows with a team
    and their ``vote``: +1, -1, 0 = not voted on; rows without a team are ignored): the
    experiment columns, ``up_a`` / ``down_a`` / ``up_b`` / ``down_b``, and ``outcome``: ``A``,
    ``B``, ``tie`` (votes, equal credit) or ``no_votes``."""
    missing = {"query_id", "rank", TEAM, "vote"} - set(labelled.columns)
    if missing:
        raise ValueError(f"impressions need columns {sorted(missing)}")
    rows = labelled[labelled[TEAM].isin([A, B])]
    keys = [c for c in EXPERIMENT if c in rows.columns]
    records: list[dict[str, Any]] = []
    for query_id, shown in rows.groupby("query_id", sort=False):
        shown = shown.sort_values("rank", kind="stable")
        teams = list(shown[TEAM])
        votes = shown["vote"].to_numpy()
        ups = [p for p, v in enumerate(votes) if v > 0]
        downs = [p for p, v in enumerate(votes) if v < 0]
        first = shown.iloc[0]
        record: dict[str, Any] = {"query_id": query_id}
        record.update({c: (None if pd.isna(first[c]) else str(first[c])) for c in keys})
        for side in (A, B):
            record[f"up_{side.lower()}"] = sum(1 for p in ups if teams[p] == side)
            record[f"down_{side.lower()}"] = sum(1 for p in downs if teams[p] == side)
        if not ups and not downs:
            record["outcome"] = NO_VOTES
        else:
            record["outcome"] = winner(teams, ups, downs) or TIE
        records.append(record)
    columns = ["query_id", *keys, "up_a", "down_a", "up_b", "down_b", "outcome"]
    return pd.DataFrame(records, columns=columns)


@dataclass(frozen=True)
class ABReport:
    """The A/B of one pair of arms (one experiment)."""

    experiment: dict[str, str | None]  # index_version, ab_arm_a, ab_arm_b
    impressions: int  # A/B impressions shown
    voted: int  # of which at least one result was voted on
    result: ABResult
    min_impressions: int

    @property
    def enough(self) -> bool:
        return self.voted >= self.min_impressions

    @property
    def winner(self) -> str | None:
        """The sign test's winner, once ``min_impressions`` voted impressions were seen."""
        return self.result.winner if self.enough else None

    @property
    def verdict(self) -> str:
        if not self.enough:
            return f"not enough impressions ({self.voted} voted < {self.min_impressions})"
        side = self.winner
        if side is None:
            return "no significant winner"
        arm = self.experiment.get(ARM_A if side == A else ARM_B) or "?"
        return f"{side} wins ({arm})"

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            **self.experiment,
            "impressions": self.impressions,
            "voted": self.voted,
            "wins_a": r.wins_a,
            "wins_b": r.wins_b,
            "ties": r.ties,
            "n": r.wins_a + r.wins_b,
            "p_value": r.p_value,
            "alpha": r.alpha,
            "min_impressions": self.min_impressions,
            "enough_impressions": self.enough,
            "winner": self.winner,
            "verdict": self.verdict,
        }


def ab_reports(
    labelled: pd.DataFrame, *, alpha: float = 0.05, min_impressions: int = 1
) -> list[ABReport]:
    """One report per experiment (:data:`EXPERIMENT`) in ``labelled`` (see
    :func:`impression_outcomes`), the latest shown first; empty without A/B impressions."""
    outcomes = impression_outcomes(labelled)
    keys = [c for c in EXPERIMENT if c in outcomes.columns]
    outcomes = outcomes.fillna({c: "" for c in keys}).assign(_order=np.arange(len(outcomes)))
    found: list[tuple[int, ABReport]] = []
    for key, group in outcomes.groupby(keys or (lambda _: ""), sort=False):
        values = key if isinstance(key, tuple) else (key,)
        voted = group[group["outcome"] != NO_VOTES]
        decided = [o if o in (A, B) else None for o in voted["outcome"]]
        report = ABReport(
            experiment={c: (str(v) or None) for c, v in zip(keys, values, strict=False)},
            impressions=len(group),
            voted=len(voted),
            result=sign_test(decided, alpha),
            min_impressions=int(min_impressions),
        )
        found.append((int(group["_order"].max()), report))
    return [r for _, r in sorted(found, key=lambda t: -t[0])]


def report_markdown(reports: Sequence[ABReport]) -> str:
    """The reports as a markdown table (the latest experiment first)."""
    lines = [
        "# Online A/B (team-draft interleaving, sign test)",
        "",
        "| index | arm A | arm B | impressions | voted | wins A | wins B | ties | p-value | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        e, r = rep.experiment, rep.result
        lines.append(
            f"| {e.get('index_version') or ''} | {e.get(ARM_A) or ''} | {e.get(ARM_B) or ''} "
            f"| {rep.impressions} | {rep.voted} | {r.wins_a} | {r.wins_b} | {r.ties} "
            f"| {r.p_value:.4g} | {rep.verdict} |"
        )
    if not reports:
        lines.append("| | | | 0 | 0 | 0 | 0 | 0 | | no A/B impressions |")
    return "\n".join(lines) + "\n"
