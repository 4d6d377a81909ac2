"""The chat page (web/chat.html) in a real headless Chromium (Debian's chromium + chromium-driver, which
.ci/run installs) driven by Selenium, against the live tiny-model server: attach the demo picture, ask, see
the answer stream in, ask a follow-up. A screenshot of the answered page is kept in the test's output
directory (its path is printed)."""
import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import TINY

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    for program in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(program), f"{program} is missing: apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox as root; no background connections (this machine has no network beyond loopback).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def ask(browser, question):
    """Type a question, send it, wait for its answer to finish; returns the answer element."""
    before = len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant"))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done='true']")) > before
        or b.find_elements(By.CSS_SELECTOR, ".turn.error"))
    errors = browser.find_elements(By.CSS_SELECTOR, ".turn.error")
    assert not errors, errors[0].text
    return browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]


def test_ask_about_the_demo_picture_and_follow_up(browser, live_server, tmp_path):
    browser.get(live_server["url"] + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "llava_tiny")
    browser.find_element(By.ID, "file").send_keys(os.path.join(TINY, "demo.png"))
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
    answer = ask(browser, "What shape is blue?")
    assert answer.text == "The blue shape is a cross."
    assert int(answer.get_attribute("data-deltas")) >= 5  # it arrived as a stream of pieces
    follow_up = ask(browser, "How many shapes are there?")
    assert follow_up.text  # the conversation went on (the server has the picture's features cached)
    assert [turn.text for turn in browser.find_elements(By.CSS_SELECTOR, ".turn.user")] == \
        ["What shape is blue?", "How many shapes are there?"]
    screenshot = tmp_path / "chat_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"\nscreenshot of the answered page: {screenshot}")
