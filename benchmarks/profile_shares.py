"""Where a pipeline run spends its time, and what tracking costs: shares of a py-spy profile.

Record a run with py-spy (raw collapsed stacks, the pipeline's processes included), then::

    py-spy record --subprocesses --rate 10 --format raw -o demo_prof.txt -- \\
        .venv/bin/python -m steps.main
    python -m benchmarks.profile_shares demo_prof.txt

It prints, per stage (the ``steps/<stage>.py`` ``run`` frame under ``steps/main.py``), its share of
all samples and the share of that stage's samples with an ``mlflow/`` frame on the stack (logging,
artifact writes, registry calls: what tracking costs, #16 §4's "under 5 %"), then the top
functions by own time and the top ``imgsearch`` functions by inclusive time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_STAGE = re.compile(r"run \((steps/\w+)\.py")
_LINE = re.compile(r":\d+\)")


def shares(path: Path, top: int = 12) -> str:
    total = tracked = 0
    stage: Counter[str] = Counter()
    stage_tracked: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        name = next(
            (m.group(1) for f in frames if (m := _STAGE.match(f)) and m.group(1) != "steps/main"),
            "other",
        )
        stage[name] += n
        if any("mlflow/" in f for f in frames):
            tracked += n
            stage_tracked[name] += n
        own[_LINE.sub(")", frames[-1])] += n
        for f in {_LINE.sub(")", f) for f in frames if "imgsearch/" in f}:
            inclusive[f] += n
    if not total:
        raise SystemExit(f"{path}: no samples")
    out = [f"{total} samples; frames in mlflow/: {tracked} ({tracked / total:.2%})", ""]
    out.append(f"{'stage':24s} {'samples':>8s} {'share':>7s} {'mlflow':>7s}")
    for s, n in stage.most_common():
        out.append(f"{s:24s} {n:8d} {n / total:7.1%} {stage_tracked[s] / n:7.1%}")
    out += ["", "top functions, own time:"]
    out += [f"{n / total:7.1%}  {f[:120]}" for f, n in own.most_common(top)]
    out += ["", "top imgsearch functions, inclusive:"]
    out += [f"{n / total:7.1%}  {f[:120]}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy raw output (collapsed stacks)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print(shares(args.profile, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
