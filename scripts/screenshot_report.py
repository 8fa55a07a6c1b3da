"""Open an HTML report in headless Chromium and save a full-page PNG of it:

    python scripts/screenshot_report.py report.html docs/report.png

The README's screenshot comes from here. tests/test_html_report.py opens reports with the same
`headless_chromium` and `open_report`, so the browser the test checks is the one the screenshot shows.
Needs selenium (the `dev` extra) and Debian's `chromium` and `chromium-driver`.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH = 1280
# Offline and quiet: no sandbox (CI runs as root), no GPU, no background calls home.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
# True once the document has loaded and every plotly div has been laid out and drawn as SVG.
PLOTS_DRAWN = """
return document.readyState === "complete" && Array.from(document.querySelectorAll(".plotly-graph-div"))
    .every(div => div._fullLayout !== undefined && div.querySelector(".main-svg") !== null);
"""


@contextmanager
def headless_chromium(profile_dir: Path) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile in `profile_dir` that records the page's console."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={WIDTH},900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for a driver on the network.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_report(driver: webdriver.Chrome, html: Path, timeout: float = 30) -> None:
    """Load the report and wait until its plots are drawn (a TimeoutException if they never are)."""
    driver.get(html.resolve().as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(PLOTS_DRAWN))


def screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile, headless_chromium(Path(profile)) as driver:
        open_report(driver, html)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WIDTH, height)
        open_report(driver, html)  # again at the full height, so responsive plots lay out for it
        driver.save_screenshot(str(png))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/screenshot_report.py REPORT.html OUT.png")
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"saved {sys.argv[2]}")
