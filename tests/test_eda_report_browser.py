"""The EDA report (``report.html`` of the eda step, :func:`imgsearch.data.eda.build_report`)
rendered by a real headless browser: its sample gallery shows decoded thumbnails (not broken-image
icons), an image that cannot be opened is left out rather than shown broken, catalog text in the
captions stays text, and every plot decodes. A screenshot of the gallery is kept in
``test-artifacts/report_gallery.png``. Skipped without Chromium, failed without it in CI
(``IMGSEARCH_REQUIRE_BROWSER=1``), exactly as ``tests/test_browser.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from imgsearch.data.eda import build_report
from tests.test_browser import ARTIFACTS, chrome  # noqa: F401  (the shared browser fixture)
from tests.test_eda import _catalog, _quarantine

SHOT = ARTIFACTS / "report_gallery.png"
#: per image under a selector: loaded, decoded size, laid-out size
DECODED = """
return Array.from(document.querySelectorAll(arguments[0])).map(function (im) {
  var box = im.getBoundingClientRect();
  return [im.complete, im.naturalWidth, im.naturalHeight, box.width, box.height];
});
"""


def test_eda_report_renders_its_gallery(chrome: Any, tmp_path: Path) -> None:  # noqa: F811
    manifest = _catalog(tmp_path, extras=True)  # 9 readable images, 5 items, 3 categories
    missing = {**manifest.iloc[0].to_dict(), "image_id": "gone", "path": str(tmp_path / "gone.png")}
    manifest = pd.concat([manifest, pd.DataFrame([missing])], ignore_index=True)
    report, _ = build_report(manifest, _quarantine(), tmp_path / "out")

    chrome.get(report.as_uri())
    thumbs = chrome.execute_script(DECODED, "#samples .thumbs img")
    assert len(thumbs) == 9, thumbs  # the unreadable file is skipped, not a broken icon
    for complete, width, height, shown_w, shown_h in thumbs:
        assert complete and width > 0 and height > 0, "a gallery thumbnail did not decode"
        assert shown_w > 0 and shown_h > 0, "a gallery thumbnail is not laid out"
    # catalog text is escaped: the category "Food <b>&</b> Drink" is read as text, not markup
    gallery = chrome.find_element("css selector", "#samples .thumbs")
    assert "Food <b>&</b> Drink" in gallery.text
    assert not chrome.find_elements("css selector", "#samples figcaption b")
    plots = chrome.execute_script(DECODED, "section:not(#samples) img")
    assert plots and all(c and w > 100 for c, w, *_ in plots), plots  # every plot decoded

    chrome.execute_script("arguments[0].scrollIntoView();", gallery)
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    assert chrome.find_element("css selector", "#samples").screenshot(str(SHOT))
    assert SHOT.stat().st_size > 1_000
