"""Make docs/web_demo.png: the web demo (python -m eval_mm.web) answering, photographed by headless Chromium.

    python docs/web_demo_screenshot.py runs/demo/sft/final runs/demo/data/synthetic/images/eval/000002.png \\
        docs/web_demo.png "Describe the image." "Find the red circle and give its box."

Uploads the image, asks each question in turn, waits until the page shows exactly what eval_mm.chat.Chat
answers on the same checkpoint, and saves the screenshot. Needs the [dev] extra (gradio, selenium) and
Debian's chromium + chromium-driver; serves on 127.0.0.1 only.
"""

import socket
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from eval_mm.chat import Chat, GenerationSettings
from eval_mm.web import build_demo, local_theme

BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,820",
    "--hide-scrollbars",
)


def main(checkpoint: str, image: str, out: str, *questions: str) -> None:
    template = Chat.from_pretrained(checkpoint, settings=GenerationSettings(max_new_tokens=64))

    def new_chat() -> Chat:
        return Chat(
            template.model,
            template.tokenizer,
            prompt_format=template.prompt_format,
            settings=template.settings,
        )

    reference = new_chat()
    answers = [reference.ask(q, images=[image] if i == 0 else []).text for i, q in enumerate(questions)]
    print("answers:", answers)
    demo = build_demo(new_chat)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        theme=local_theme(),
        footer_links=[],
    )
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0].send_keys(image)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        for i, question in enumerate(questions):
            driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
            driver.find_element(By.CSS_SELECTOR, "#send").click()
            wait.until(
                lambda d, n=i + 1: (
                    [
                        e.get_attribute("textContent")
                        for e in d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
                    ]
                    == answers[:n]
                )
            )
        time.sleep(3)  # the boxes image of the last answer
        driver.save_screenshot(out)
        print(f"wrote {out}")
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
