"""The served model and the search page for real, checked from a real headless browser.

One test starts, side by side, ``mlflow models serve`` of the session's tiny
``imgsearch-index@champion`` (:mod:`tests.search_env`) and ``streamlit run app/search_page.py``
(headless, a free port, the same tracking store, a fresh feedback database), then drives the page
from headless Chromium through Selenium: it uploads a gallery image, waits for the ranked grid,
clicks the thumbs-up of the first result and checks the vote row in the feedback database (rank,
result, model versions). Then, from a page of the scoring server's own origin, the browser POSTs
the same image to ``/invocations`` with ``fetch`` and the served model must rank it first too.

The screenshot of the page with its results is saved to ``test-artifacts/search_page.png`` at the
repository root (gitignored; CI can keep it as an artifact). Set ``IMGSEARCH_TEST_ARTIFACTS`` to
write it elsewhere.

Needs Chromium and its driver from Debian's packages (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them) and ``selenium`` (the ``dev`` extra). Selenium is
given ``/usr/bin/chromedriver`` and the Chromium binary explicitly, so Selenium Manager never
downloads anything. Without them the test is skipped with the reason, unless
``IMGSEARCH_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from registry.feedback import FeedbackStore
from tests.search_env import SearchEnv, free_port, get_env, run_process, serve_model, venv_tool

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "app" / "search_page.py"
ARTIFACTS = Path(os.environ.get("IMGSEARCH_TEST_ARTIFACTS") or ROOT / "test-artifacts")
SCREENSHOT = ARTIFACTS / "search_page.png"
REQUIRE_ENV = "IMGSEARCH_REQUIRE_BROWSER"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
RESULT_NAMES = "//strong[contains(., '. thing')]"  # "**1. thing 1**" per result cell
THUMBS_UP = "//button[contains(normalize-space(.), '👍')]"
#: The page loads the model on its first run; the grid renders after a query's search.
PAGE_TIMEOUT_S = 120


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _requirements() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why the test cannot run here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    browser = _chromium()
    if browser is None:
        return "no chromium (apt-get install chromium chromium-driver; .ci/run does it)"
    if not os.access(CHROMEDRIVER, os.X_OK):
        return f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)"
    return browser, CHROMEDRIVER


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    found = _requirements()
    if isinstance(found, str):
        if os.environ.get(REQUIRE_ENV) == "1":  # CI (.ci/run) installs the browser: never skip
            pytest.fail(f"{REQUIRE_ENV}=1 but {found}")
        pytest.skip(found)
    browser, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1400",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def servers(
    chrome: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SearchEnv, str, str, str]]:
    """(env, served model URL, page URL, feedback URL): both servers started together."""
    env = get_env(tmp_path_factory)
    root = tmp_path_factory.mktemp("browser")
    feedback = f"sqlite:///{root / 'feedback.db'}"
    port = free_port()
    page_url = f"http://127.0.0.1:{port}"
    page_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env.uri,
        "MLFLOW_REGISTRY_URI": env.uri,
        "IMGSEARCH_FEEDBACK_URL": feedback,
        "IMGSEARCH_HOME": str(root / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    streamlit = [
        *venv_tool("streamlit"),
        "run",
        str(PAGE),
        "--server.headless=true",
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
    ]
    with ExitStack() as stack:
        model = stack.enter_context(serve_model(env.uri, root / "serve", wait=False))
        page = stack.enter_context(
            run_process(
                streamlit,
                url=page_url,
                ready_url=f"{page_url}/_stcore/health",
                log_path=root / "streamlit.log",
                cwd=ROOT,
                env=page_env,
                wait=False,
            )
        )
        model.wait()
        page.wait()
        yield env, model.url, page_url, feedback


def _wait_for(driver: Any, xpath: str, timeout: float = PAGE_TIMEOUT_S) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.visibility_of_element_located((By.XPATH, xpath)))


def _wait_until(driver: Any, condition: Any, timeout: float = PAGE_TIMEOUT_S) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders as deltas arrive: an element found a moment ago may be replaced
    wait = WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition)


def _at_least(by: str, selector: str, n: int) -> Any:
    """A wait condition: the matching elements once there are ``n`` or more (else falsy)."""

    def found(driver: Any) -> list[Any] | None:
        elements = driver.find_elements(by, selector)
        return elements if len(elements) >= n else None

    return found


def _text_xpath(text: str) -> str:
    return f"//*[contains(normalize-space(.), '{text}') and not(.//*[contains(normalize-space(.), '{text}')])]"


def test_page_and_served_model_from_a_headless_browser(
    chrome: Any, servers: tuple[SearchEnv, str, str, str]
) -> None:
    from selenium.webdriver.common.by import By

    env, model_url, page_url, feedback = servers
    start = time.monotonic()
    chrome.get(page_url)
    caption = _wait_for(chrome, _text_xpath("Answered by"))
    assert f"imgsearch-index v{env.pair.index.version}" in caption.text
    # .streamlit/config.toml (read from the repository root) sets client.toolbarMode = "viewer":
    # no Deploy button (in "developer" mode Streamlit 1.67 draws it as stAppDeployButton)
    assert chrome.find_elements(By.CSS_SELECTOR, "[data-testid='stToolbar']")  # drawn by now
    assert not chrome.find_elements(By.CSS_SELECTOR, "[data-testid='stAppDeployButton']")
    assert not chrome.find_elements(By.XPATH, "//button[normalize-space(.)='Deploy']")

    # upload a gallery image: Streamlit's uploader is an <input type=file> under the drop zone
    upload = _wait_until(chrome, _at_least(By.CSS_SELECTOR, "input[type='file']", 1))[0]
    upload.send_keys(str(env.paths[2]))
    first = _wait_for(chrome, "//strong[starts-with(normalize-space(.), '1. ')]")
    assert first.text == "1. thing 1"  # img2 belongs to item1, "thing 1"
    n = len(env.images)
    names = [e.text for e in _wait_until(chrome, _at_least(By.XPATH, RESULT_NAMES, n))]
    assert len(names) == n and names[0] == "1. thing 1", names
    assert f"{n} results" in chrome.find_element(By.TAG_NAME, "body").text

    up_buttons = _wait_until(chrome, _at_least(By.XPATH, THUMBS_UP, n))
    assert len(up_buttons) == n
    up_buttons[0].click()
    _wait_for(chrome, _text_xpath("Thanks, feedback recorded."))
    _wait_for(chrome, "//strong[starts-with(normalize-space(.), '1. ')]")  # grid back after rerun

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert chrome.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

    store = FeedbackStore(feedback)
    try:
        votes = store.votes()
    finally:
        store.dispose()
    assert len(votes) == 1, votes
    vote = votes.iloc[0]
    assert (vote["vote"], vote["rank"], vote["result_image_id"]) == (1, 1, "img2")
    assert vote["index_version"] == str(env.pair.index.version)
    assert vote["extractor_version"] == str(env.pair.extractor.version)
    assert vote["query_image_id"] is None

    # the served model, queried from the browser: a page of the scoring server's own origin
    # (so no CORS) POSTs the same image to /invocations with fetch()
    chrome.get(f"{model_url}/ping")
    payload = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(env.images[2]).decode()]],
        },
        "params": {"k": 3},
    }
    answer = chrome.execute_async_script(
        """
        const [payload, done] = arguments;
        fetch('/invocations', {method: 'POST', headers: {'Content-Type': 'application/json'},
                               body: JSON.stringify(payload)})
          .then(async r => done({status: r.status, body: await r.json()}))
          .catch(e => done({status: -1, body: String(e)}));
        """,
        payload,
    )
    assert answer["status"] == 200, answer
    rows = answer["body"]["predictions"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["image_id"] == "img2" and rows[0]["item_name"] == "thing 1"
    assert time.monotonic() - start < PAGE_TIMEOUT_S
