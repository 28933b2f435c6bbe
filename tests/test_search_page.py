"""The search page in a real browser: headless Debian Chromium driven by selenium.

Types a query, waits for the result grid, checks that every thumbnail decoded
(naturalWidth > 0), clicks a moment (not at 0 s, of another video than the first result's)
and checks that the player plays that video from the moment's start time as the JSON API
returns it for the same query. Skips, saying why, only when chromium / chromedriver are
absent (scripts/install_browser.sh installs them). SEARCH_PAGE_SCREENSHOT=path also saves a
screenshot there (README_unified.md shows docs/search_page.png made so).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest

from tests.library_fixture import build_library

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="chromium / chromedriver not installed (run scripts/install_browser.sh as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from modules.search_server import create_app

    _, library = build_library(tmp_path_factory.mktemp("page"))
    port = _free_port()
    config = uvicorn.Config(create_app(library), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,800", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_query_results_thumbnails_and_player_start(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys("a counter ticking", Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "grid").get_attribute("data-done") == "1")
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert len(cards) == 12  # 3 clips x 4 moments, top 12
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete)"))
    widths = browser.execute_script("return [...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths
    # the moments as the JSON API gives them for the same query: the player must start at
    # the API's start_time (not merely at whatever the page wrote into the card)
    api = json.loads(urllib.request.urlopen(server + "/api/search?" + urllib.parse.urlencode(
        {"q": "a counter ticking", "top_k": 12, "moments": "true"}), timeout=60).read())["results"]
    assert len(api) == len(cards)
    index, hit = next((i, h) for i, h in enumerate(api) if h["start_time"] > 0 and h["row"] != api[0]["row"])
    target = cards[index]
    assert target.find_element(By.CSS_SELECTOR, ".name").text == hit["name"]
    target.click()
    wait.until(lambda d: d.execute_script(
        "const p = document.getElementById('player'); return p.readyState >= 1 && !p.seeking && p.dataset.start !== undefined"))
    current, src = browser.execute_script(
        "const p = document.getElementById('player'); return [p.currentTime, p.dataset.src]")
    assert src == hit["video_url"]
    assert current == pytest.approx(hit["start_time"], abs=0.05)
    assert "results from 3 videos" in browser.find_element(By.ID, "status").text
    shot = os.environ.get("SEARCH_PAGE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)
