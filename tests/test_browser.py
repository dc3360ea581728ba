"""End to end: serve a generated run, drive headless Chromium through the page, screenshot it.

Needs Debian's ``chromium`` and ``chromium-driver`` plus the ``selenium`` package
(scripts/ci-extra.sh installs them).  Without them the test skips, except under CI (``CI`` set),
where it fails: the browser check must not silently vanish there.

The screenshot lands in ``tests/artifacts/browser.png`` (that folder ignores itself in git).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        selenium_ok = False
    else:
        selenium_ok = True
    missing = [name for name, ok in (("chromium", chromium), ("chromium-driver", driver), ("selenium", selenium_ok)) if not ok]
    if missing:
        reason = f"browser test needs {', '.join(missing)} (run scripts/ci-extra.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: required under CI")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture
def server(tmp_path):
    from conftest import build_tiny_model
    from test_features_server import build_run, make_app
    from werkzeug.serving import make_server

    app = make_app(build_run(tmp_path / "run", build_tiny_model))
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_click_through_to_a_latent_card(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(server)
    # model → site → layer → SAE
    wait.until(lambda d: len(Select(d.find_element(By.ID, "pick-sae")).options) > 0)
    Select(browser.find_element(By.ID, "pick-kind")).select_by_visible_text("resid_post")
    Select(browser.find_element(By.ID, "pick-layer")).select_by_visible_text("2")
    wait.until(lambda d: "layer_2/resid_post" in d.find_element(By.ID, "sae-summary").text)

    # browse list (by max activation) → first latent's card
    first = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#browse-list li")))
    latent = first.get_attribute("data-latent")
    first.click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#card h2"), f"Latent {latent}"))
    tokens = browser.find_elements(By.CSS_SELECTOR, "#top-contexts .tok")
    assert tokens, "no highlighted contexts rendered"
    lit = [t for t in tokens if "rgba(247, 103, 7" in (t.get_attribute("style") or "")]
    assert lit, "no token is coloured by its activation"
    assert browser.find_elements(By.CSS_SELECTOR, "#top-contexts .tok.focus")
    assert browser.find_elements(By.CSS_SELECTOR, "#card svg rect"), "no histogram bars"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#card table.logits.pos tr")) == 10
    card_ms = float(browser.execute_script("return document.body.dataset.cardMs"))
    print(f"latent card loaded and rendered in {card_ms:.1f} ms")

    # token search → a latent that fires on ' Paris' → its card
    browser.find_element(By.ID, "token-input").send_keys("Paris")
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    hit = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#token-results li[data-latent]")))
    hit_latent = hit.get_attribute("data-latent")
    hit.click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#card h2"), f"Latent {hit_latent}"))
    assert "Paris" in browser.find_element(By.ID, "top-contexts").text

    # live box: run the model on a sentence, coloured by the shown latent
    box = browser.find_element(By.ID, "live-text")
    box.clear()
    box.send_keys("the tower in Paris is the largest in France")
    browser.find_element(By.CSS_SELECTOR, "#live-form button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#live-tokens .tok")) == 10)  # BOS + 9 words
    browser.find_elements(By.CSS_SELECTOR, "#live-tokens .tok")[4].click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "live-detail"), '" Paris":'))

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    shot = ARTIFACTS / "browser.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
