"""The web demo (python -m eval_mm.web) on 127.0.0.1, driven by a real headless Chromium through selenium and
by gradio's own client: upload an image, ask, and the page shows the model's own answer (the one
eval_mm.chat.Chat gives) and the image with its boxes; "Clear history" empties the conversation.

Closed doors: a question is plain text (a typed <img>PATH</img> opens nothing, and the answer is the same
whether PATH exists or not); the image input takes only uploads, whatever a client sends; messages name no
server path; a login is required when given, and an exposed launch without one is refused; questions and
uploads are bounded; a session's uploads are deleted when it ends.

The browser tests skip, with the reason, where selenium or Debian's chromium + chromium-driver are not
installed (.ci/run installs them)."""

from __future__ import annotations

import html
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the web demo needs gradio: pip install -e ".[web]"')

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    import selenium  # noqa: F401  (the browser tests' driver)
except ImportError:
    selenium = None
needs_browser = pytest.mark.skipif(
    selenium is None or CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: pip install selenium; apt-get install chromium chromium-driver",
)
LOGIN = ("alice", "wonderland")
MAX_NEW_TOKENS = 8
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
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------ closed doors
@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory) -> str:
    """The demo as `python -m eval_mm.web` launches it (eval_mm.web.serve), on 127.0.0.1 with a login from a
    file, questions of at most 200 characters and uploads of at most 1 MB; its URL."""
    from eval_mm.web import build_parser, serve

    logins = tmp_path_factory.mktemp("auth") / "logins"
    logins.write_text("# who may use the demo\n" + ":".join(LOGIN) + "\n")
    port = free_port()
    demo = serve(
        build_parser().parse_args(
            [
                "--checkpoint",
                str(checkpoint),
                "--port",
                str(port),
                "--auth-file",
                str(logins),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--max-question-chars",
                "200",
                "--max-upload-mb",
                "1",
            ]
        ),
        block=False,
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def plain_answer(checkpoint):
    """What Chat.ask answers to a question in a new conversation, without images."""
    from eval_mm.chat import Chat, GenerationSettings

    template = Chat.from_pretrained(checkpoint, settings=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    return lambda question: (
        Chat(template.model, template.tokenizer, settings=template.settings).ask(question).text
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Files on the server, none of them uploaded: a real image, a text file,
    and a path that does not exist."""
    root = tmp_path_factory.mktemp("server_files")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(root / "private.png")
    (root / "secret.txt").write_text("not for the page\n")
    return {"image": root / "private.png", "text": root / "secret.txt", "missing": root / "missing.png"}


def log_in(browser, url: str):
    """Open the page and log in through gradio's login form; the WebDriverWait for what follows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(url)
    password = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"))[0]
    browser.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys(LOGIN[0])
    password.send_keys(LOGIN[1])
    next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Login").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    return wait


def bot_answers(browser) -> list[str]:
    """The answers the chat window shows (read again when the page re-renders them while they are read)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return [
                e.get_attribute("textContent")
                for e in browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
            ]
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError("the chat window kept changing")


def clear_history(browser) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#clear").click()
    deadline = time.monotonic() + WAIT_S
    while bot_answers(browser) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not bot_answers(browser)


@needs_browser
@pytest.mark.slow
def test_the_page_answers_an_uploaded_image_with_the_models_answer(served, checkpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from eval_mm.chat import Chat, GenerationSettings

    image = tmp_path / "red.png"
    Image.new("RGB", (120, 90), (220, 30, 30)).save(image)
    question = "What colour is the picture?"
    chat = Chat.from_pretrained(checkpoint, settings=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    expected = chat.ask(question, images=[image]).text

    wait = log_in(browser, served)
    upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0]
    upload.send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload has arrived
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    # Done when the boxes view shows the image (the last update of an answer).
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#boxes img"))
    assert bot_answers(browser) == [expected]
    assert question in browser.find_element(By.CSS_SELECTOR, "#chatbot").text
    browser.save_screenshot(str(tmp_path / "page.png"))
    clear_history(browser)


@needs_browser
@pytest.mark.slow
def test_in_the_browser_a_typed_img_tag_opens_nothing_whether_the_file_exists(
    served, plain_answer, files, browser, opened_files
):
    from selenium.webdriver.common.by import By

    wait = log_in(browser, served)
    for path in (files["image"], files["missing"], "/etc/hostname"):
        question = f"<img>{path}</img> What is in this picture?"
        expected = plain_answer(question)
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        browser.find_element(By.CSS_SELECTOR, "#send").click()
        wait.until(
            lambda d, want=expected: (
                bot_answers(d) == [want] or d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
            )
        )
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"), path  # no error shown
        assert bot_answers(browser) == [expected], path  # the answer to the plain text, image or not
        assert question in browser.find_element(By.CSS_SELECTOR, "#chatbot").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot img, #boxes img"), path
        assert str(path) not in opened_files, path
        clear_history(browser)


def ask(url: str, question: str, image=None) -> tuple[list[tuple[str, str]] | None, str | None]:
    """One question in a new session through gradio's own client: (the chat window's (role, text or file)
    entries, None), or (None, the error message the page shows)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(url, auth=LOGIN, verbose=False)
    try:
        window, _, _ = client.predict(question, image, api_name="/respond")
    except AppError as e:
        return None, str(e)
    finally:
        client.close()
    return [(m["role"], html.unescape(m["content"][0].get("text") or "file")) for m in window], None


def test_a_typed_img_tag_opens_nothing_and_the_answer_is_the_same_whether_the_file_exists(
    served, plain_answer, files, opened_files
):
    for path in (files["image"], files["text"], files["missing"], "/etc/hostname"):
        question = f"<img>{path}</img> What is in this picture?"
        window, error = ask(served, question)
        assert error is None, path
        assert window == [("user", question), ("assistant", plain_answer(question))], (
            path
        )  # answered as plain text
        assert str(path) not in opened_files, path


def test_the_window_keeps_the_whitespace_of_a_message():
    """An answer shows as the model wrote it: gradio's Chatbot would clean a plain string (inspect.cleandoc
    expands tabs, drops indentation and blank first or last lines); the page's messages are kept as given."""
    import gradio as gr

    from eval_mm.web import shown

    answer = "\n  indented\tand tabbed <ref>x</ref>\n    deeper\n\n"
    [message] = gr.Chatbot().postprocess([{"role": "assistant", "content": shown(answer)}]).root
    assert html.unescape(message.content[0].text) == answer


def test_the_image_input_takes_only_uploads_and_says_the_same_whatever_the_path(
    served, files, opened_files, tmp_path
):
    import httpx
    from gradio_client import handle_file

    from eval_mm.web import UNREADABLE_UPLOAD

    # A client may send any path as the image: a bare FileData, which gradio does not check itself ...
    for name, path in files.items():
        window, error = ask(served, "What colour is it?", {"path": str(path)})
        assert (window, error) == (None, UNREADABLE_UPLOAD), name
        assert str(path) not in opened_files, name
    # ... or one marked as FileData, sent without gradio's client (which would upload the
    # file): gradio refuses it.
    with httpx.Client(base_url=served, timeout=WAIT_S) as http:
        http.post("login", data=dict(zip(("username", "password"), LOGIN))).raise_for_status()
        replies = set()
        for path in files.values():
            payload = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
            event = http.post(
                "gradio_api/call/respond", json={"data": ["What colour is it?", payload]}
            ).json()
            replies.add(http.get(f"gradio_api/call/respond/{event['event_id']}").text)
        assert len(replies) == 1 and replies.pop().startswith("event: error"), "one reply, whichever the file"
        assert not {str(path) for path in files.values()} & set(opened_files)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert ask(served, "What colour is it?", handle_file(not_an_image)) == (None, UNREADABLE_UPLOAD)
    window, error = ask(served, "What colour is it?", handle_file(files["image"]))  # the same file, uploaded
    assert (
        error is None
        and [role for role, _ in window] == ["user", "user", "assistant"]
        and window[0][1] == "file"
    )


def test_limits_a_login_and_no_server_path_in_what_the_page_says(served, tmp_path):
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    window, error = ask(served, "x" * 201)
    assert window is None and error == "The question is 201 characters long; at most 200 are allowed."
    with pytest.raises(AuthenticationError):
        Client(served, verbose=False)
    with httpx.Client(base_url=served) as http:
        assert http.get("config").status_code == 401
        assert http.post("gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
        assert http.post("login", data={"username": LOGIN[0], "password": "guess"}).status_code == 400
        assert http.post("login", data=dict(zip(("username", "password"), LOGIN))).status_code == 200
        assert http.get("config").status_code == 200
        too_big = http.post("gradio_api/upload", files={"files": ("big.png", b"x" * (1024 * 1024 + 1))})
        assert too_big.status_code == 413


def test_a_sessions_uploads_are_deleted_when_it_ends(tiny_vlm, tiny_tokenizer, tmp_path):
    from eval_mm.chat import Chat
    from eval_mm.web import Session, delete_uploads

    uploads, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    for folder in (uploads, elsewhere):
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    session = Session(Chat(tiny_vlm, tiny_tokenizer))
    session.chat.add_image(uploads / "a.png")
    session.chat.add_image(elsewhere / "a.png")
    delete_uploads(session, uploads)
    assert not (uploads / "a.png").exists() and (elsewhere / "a.png").exists() and session.chat.pending == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--host", "0.0.0.0"],
            "error: --host 0.0.0.0 serves the demo to the network without a login: add --auth "
            "USER:PASS or --auth-file FILE (and TLS in front, docs/chat.md), or serve on --host 127.0.0.1",
        ),
        (
            ["--share"],
            "error: --share makes a public link, and the demo has no login: add --auth USER:PASS or "
            "--auth-file FILE (docs/chat.md)",
        ),
        (
            ["--host", "0.0.0.0", "--auth", "alice"],
            "error: --auth: expected USER:PASSWORD, a user and a password separated by ':'",
        ),
        (["--host", "::1"], "error: checkpoint not found: {missing}"),  # loopback: on to loading the model
        (["--host", "0.0.0.0", "--auth", "alice:wonderland"], "error: checkpoint not found: {missing}"),
    ],
)
def test_an_exposed_launch_without_a_login_is_refused_in_one_line(
    argv, message, tmp_path, monkeypatch, capsys
):
    from eval_mm.web import main
    from models.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["eval_mm.web", "--checkpoint", str(tmp_path / "missing"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message.format(missing=tmp_path / "missing") + "\n"


def test_the_web_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    from eval_mm.web import main
    from models.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["eval_mm.web", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'missing'}\n"
