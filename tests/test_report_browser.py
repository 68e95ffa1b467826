"""The evaluation report (``report.html`` of every evaluate run) rendered by a real headless
browser: its example and worst-query galleries show decoded thumbnails, relevant results
outlined in green, and the per-category plot. A screenshot is kept in
``test-artifacts/evaluation_report.png``. Skipped without Chromium, failed without it in CI
(``IMGSEARCH_REQUIRE_BROWSER=1``), exactly as ``tests/test_browser.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw

from imgsearch.evaluate.report import evaluation_html
from tests.test_browser import ARTIFACTS, chrome  # noqa: F401  (the shared browser fixture)

SHOT = ARTIFACTS / "evaluation_report.png"
#: per image in the galleries: loaded, decoded, laid out (not a broken-image icon)
DECODED = """
return Array.from(document.querySelectorAll(arguments[0] + ' img')).map(function (im) {
  var box = im.getBoundingClientRect();
  return [im.complete, im.naturalWidth, im.naturalHeight, box.width, box.height,
          getComputedStyle(im.parentElement).borderTopColor];
});
"""


def _catalog(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Six items, two drawings each (a shape in two colours): distinct real PNG files."""
    paths, items = {}, {}
    shapes = ("ellipse", "rectangle", "polygon")
    for k in range(6):
        for v, colour in enumerate(("#c33", "#33c")):
            image_id = f"item{k}_v{v}"
            img = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(img)
            box = (8 + k, 8, 56, 56 - k)
            if shapes[k % 3] == "polygon":
                draw.polygon([(32, 6 + k), (58, 58), (6, 58)], fill=colour)
            else:
                getattr(draw, shapes[k % 3])(box, fill=colour)
            paths[image_id] = str(root / f"{image_id}.png")
            img.save(paths[image_id])
            items[image_id] = f"item{k}"
    return paths, items


def test_evaluation_report_renders_its_gallery(chrome: Any, tmp_path: Path) -> None:  # noqa: F811
    paths, items = _catalog(tmp_path)
    ids = sorted(paths)
    rows = []
    for q in ids:  # each query's top 4: its own item's other drawing first for even items
        others = [i for i in ids if i != q]
        mate = next(i for i in others if items[i] == items[q])
        rest = [i for i in others if i != mate][:3]
        good = int(items[q][-1]) % 2 == 0
        top = [mate, *rest] if good else [*rest, mate]
        rows.append({"image_id": q, "item_id": items[q], "ap": 1.0 if good else 0.25,
                     "top_ids": ";".join(top)})  # fmt: skip
    per_query = pd.DataFrame(rows)
    per_category = pd.DataFrame(
        {
            "category": ["round", "square", "pointed"],
            "n_queries": [4, 4, 4],
            "map_at_r": [0.9, 0.6, 0.3],
            "hit_at_1": [1.0, 0.5, 0.5],
        }  # fmt: skip
    )
    page = evaluation_html(
        {"map_at_r": 0.625, "hit_at_1": 0.5, "n_queries": 12, "n_gallery": 12},
        per_query,
        per_category,
        paths,
        items,
        "evaluate · finetuned mobilenet_v2",
        n_examples=6,
        n_worst=4,
    )
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")

    chrome.get(report.as_uri())
    assert chrome.title == "evaluate · finetuned mobilenet_v2"
    examples = chrome.execute_script(DECODED, "#examples")
    worst = chrome.execute_script(DECODED, "#worst")
    assert len(examples) == 6 * (1 + 4) and len(worst) == 4 * (1 + 4)
    for complete, width, height, shown_w, shown_h, _ in examples + worst:
        assert complete and width > 0 and height > 0, "a thumbnail did not decode"
        assert shown_w > 0 and shown_h > 0, "a thumbnail is not laid out"
    outlined = [b for *_, b in examples + worst if b.replace(" ", "") == "rgb(34,170,34)"]
    assert len(outlined) == 6 + 4, outlined  # one relevant result in each query's row
    # the worst queries come first by AP: every row there is a query whose mate ranked last
    worst_text = chrome.find_element("css selector", "#worst").text
    assert "AP 0.25" in worst_text and "AP 1.00" not in worst_text
    plots = chrome.execute_script(
        "return Array.from(document.images).filter(i => !i.closest('table'))"
        ".map(i => i.naturalWidth);"
    )
    assert plots and all(w > 100 for w in plots), plots  # the per-category plot decoded
    body = chrome.find_element("tag name", "body").text
    assert "MAP@R: precision over the first R results" in body
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(SHOT))
    assert SHOT.stat().st_size > 10_000
