"""The retrieval chain: extract -> index -> evaluate -> align -> register -> promote, written once.

``steps.main`` runs it for the baseline and the fine-tuned extractor; ``monitoring.improve`` runs
it for a fine-tuned challenger (a full rebuild) and to extend the champion's index with new
vectors (no extract: the embeddings exist; ``index`` in add mode; an index-only registration).
Each step is a nested run; ``Chain.done(name, run_id)`` records it (the caller's ``imgsearch.run.*``
tags) and ``Chain.before(stage, name)`` runs before each step (improve: the stop/pause hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from steps import align, evaluate, extract, index, promote, register

STAGES = ("extract", "index", "evaluate", "align", "register", "promote")


@dataclass(frozen=True)
class ChainNames:
    """The name each step's run is recorded under (``done``)."""

    extract: str = "extract"
    index: str = "index"
    evaluate: str = "evaluate"
    align: str = "align"
    register: str = "register"
    promote: str = "promote"

    @classmethod
    def prefixed(cls, prefix: str) -> ChainNames:
        return cls(*(f"{prefix}{stage}" for stage in STAGES))


@dataclass
class Chain:
    """How the chain's steps are run and recorded."""

    kw: Mapping[str, Any]  # ``overrides`` and ``profile`` for every step
    done: Callable[[str, str], str]
    before: Callable[[str, str], None] = lambda stage, name: None
    names: ChainNames = field(default_factory=ChainNames)

    def _step(self, stage: str, call: Callable[[], str]) -> str:
        name = getattr(self.names, stage)
        self.before(stage, name)
        return self.done(name, call())


@dataclass
class ChainRuns:
    extract: str
    index: str
    evaluate: str
    align: str | None
    register: str
    promote: str | None


def run_chain(
    chain: Chain,
    *,
    data_run_id: str,
    eval_split_run_id: str,
    preprocess_run_id: str | None = None,
    extractor_uri: str | None = None,
    extract_run_id: str | None = None,
    add_to_index_run_id: str | None = None,
    texts_run_id: str | None = None,
    extractor_run_id: str | None = None,
    register_with: Callable[[str, str, str, str | None], str] | None = None,
    after_evaluate: Callable[[str], None] | None = None,
    do_promote: bool = True,
    trunk_uri: str | None = None,
    write_trunk: bool = False,
) -> ChainRuns:
    """Run the chain; returns the run id of each step.

    ``data_run_id``: the manifest (with split) to embed and index. ``eval_split_run_id``: the split
    the evaluation (and so the gate) measures. ``extract_run_id`` given: no extract step, its
    embeddings are indexed. ``add_to_index_run_id``: index in add mode on that run's index.
    ``texts_run_id``: the ingest run holding ``texts.parquet``; when it has texts (and
    ``align.enabled``), ``align`` maps a text tower into this extractor's image space and the
    registered index answers text queries too. ``extractor_run_id``: where the extractor of
    ``extract_run_id``'s embeddings lives when that run has none (merged embeddings).
    ``register_with(extract, index, evaluate, align) -> run_id`` replaces ``steps.register.run``;
    ``after_evaluate(extract_run_id)`` runs between evaluate and register. ``trunk_uri`` /
    ``write_trunk``: the extract step starts from / writes the frozen trunk's outputs
    (:mod:`imgsearch.embed.trunk`).
    """
    kw = dict(chain.kw)
    if extract_run_id is None:
        extract_run_id = chain._step(
            "extract",
            lambda: extract.run(
                preprocess_run_id or data_run_id,
                split_run_id=data_run_id,
                extractor_uri=extractor_uri,
                trunk_uri=trunk_uri,
                write_trunk=write_trunk,
                **kw,
            ),
        )
    ex = extract_run_id
    ix = chain._step(
        "index",
        lambda: index.run(
            ex, split_run_id=data_run_id, add_to_index_run_id=add_to_index_run_id, **kw
        ),
    )
    ev = chain._step("evaluate", lambda: evaluate.run(ex, eval_split_run_id, **kw))
    if after_evaluate is not None:
        after_evaluate(ex)
    al = None
    if texts_run_id is not None and align.wanted(texts_run_id, **kw):
        al = chain._step(
            "align",
            lambda: align.run(
                ex, data_run_id, texts_run_id, extractor_run_id=extractor_run_id, **kw
            ),
        )
    reg = register_with or (lambda e, i, v, a: register.run(e, i, v, align_run_id=a, **kw))
    rg = chain._step("register", lambda: reg(ex, ix, ev, al))
    promote_kw = dict(kw)
    if add_to_index_run_id is not None:
        # the champion's index plus new images, same extractor: the gate asks only for no
        # regression on the frozen test split (registry.promote.promote, extends_index)
        overrides = {**(kw.get("overrides") or {}), "promote.extends_index": True}
        promote_kw["overrides"] = overrides
    pr = chain._step("promote", lambda: promote.run(**promote_kw)) if do_promote else None
    return ChainRuns(ex, ix, ev, al, rg, pr)
