"""The web demo (python -m eval_mm.web) driven by a real headless Chromium through selenium, on 127.0.0.1: upload
an image, ask, and the page shows the model's own answer (the one eval_mm.chat.Chat gives) and the image with
its boxes; "Clear history" empties the conversation. Skipped, with the reason, where gradio, selenium or
Debian's chromium + chromium-driver are not installed (.ci/run installs them)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the web demo needs gradio: pip install -e ".[web]"')
pytest.importorskip("selenium", reason='the browser test needs selenium: pip install -e ".[dev]"')

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                   reason="no headless browser: apt-get install chromium chromium-driver")
WAIT_S = 120  # generous: CI machines are small and shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft")
    tiny_vlm.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "stage": "sft"}))
    return path


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@needs_browser
@pytest.mark.slow
def test_the_page_answers_an_uploaded_image_with_the_models_answer(checkpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from eval_mm.chat import Chat, GenerationSettings
    from eval_mm.web import build_demo, local_theme

    image = tmp_path / "red.png"
    Image.new("RGB", (120, 90), (220, 30, 30)).save(image)
    question = "What colour is the picture?"
    template = Chat.from_pretrained(checkpoint, settings=GenerationSettings(max_new_tokens=12))
    expected = Chat(template.model, template.tokenizer, settings=template.settings).ask(question, images=[image]).text

    demo = build_demo(lambda: Chat(template.model, template.tokenizer, settings=template.settings))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        theme=local_theme(), footer_links=[])
    try:
        wait = WebDriverWait(browser, WAIT_S)
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0]
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload has arrived
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        browser.find_element(By.CSS_SELECTOR, "#send").click()

        # Done when the boxes view shows the image (the last update of an answer).
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#boxes img"))
        answers = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")]
        assert answers == [expected]
        assert question in browser.find_element(By.CSS_SELECTOR, "#chatbot").text
        browser.save_screenshot(str(tmp_path / "page.png"))

        browser.find_element(By.CSS_SELECTOR, "#clear").click()
        deadline = time.monotonic() + WAIT_S
        while browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
    finally:
        demo.close()


def test_the_web_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    from eval_mm.web import main
    from models.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["eval_mm.web", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'missing'}\n"
