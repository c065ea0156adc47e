"""Headless Debian Chromium for the UI tests (trend page, trigger forms), driven by selenium."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver  # the dev extra; a missing install must fail, not skip
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# this machine's network is closed: no background connections, no first-run or update checks
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
)


def headless_chromium(profile: Path, log: Path, window: str, timeout_s: float) -> webdriver.Chrome:
    """A fresh headless Chromium with its own profile folder; chromedriver logs to `log`."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("needs Debian chromium + chromium-driver: run scripts/setup.sh test")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--window-size={window}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(log)), options=options
    )
    driver.set_page_load_timeout(timeout_s)
    driver.set_script_timeout(timeout_s)
    return driver


def log_in(
    driver: webdriver.Chrome, base: str, next_url: str, user: str, password: str, timeout_s: float
) -> None:
    """Fill the simple auth manager's login page; returns once the browser has left it."""
    driver.get(f"{base}/auth/login?next={next_url}")
    wait = WebDriverWait(driver, timeout_s)
    wait.until(lambda d: d.find_elements(By.NAME, "username"))
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/auth/login" not in d.current_url)


@contextlib.contextmanager
def logged_in_chromium(
    base_url: str, landing: str, password: str, folder: Path, timeout_s: float
) -> Iterator[webdriver.Chrome]:
    """Headless Chromium (profile and driver log under `folder`) logged in as admin through the simple
    auth manager's login page, on `landing`; quit on exit."""
    (folder / "profile").mkdir(parents=True, exist_ok=True)
    driver = headless_chromium(folder / "profile", folder / "chromedriver.log", "1280,1000", timeout_s)
    try:
        log_in(driver, base_url, landing, "admin", password, timeout_s)
        yield driver
    finally:
        driver.quit()
