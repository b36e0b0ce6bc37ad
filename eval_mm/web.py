"""A web page to chat with a checkpoint about images (gradio, the optional extra ``[web]``):

    python -m eval_mm.web --checkpoint runs/demo/sft/final [--base DIR] [--host 127.0.0.1] [--port 7860]

Upload an image, ask; the answer streams in, and its grounded boxes (``<ref>..</ref><box>..</box>``) are drawn
on the image beside the chat. "Clear history" starts over. Every browser session has its own conversation:
an ``eval_mm.chat.Chat`` (the same logic as ``python -m eval_mm chat``) over one shared model.

Safe by default (docs/chat.md "Serving beyond this machine"): it serves on 127.0.0.1, never makes a public
share link unless ``--share`` asks, and refuses any other address (or ``--share``) without a login
(``--auth USER:PASS`` or ``--auth-file FILE``). Images come only from the upload box: a question is plain
text, never read for ``<img>PATH</img>``. Uploads are limited in size and deleted when their session ends
(or ``--keep-uploads-s`` after upload); the queue, the question and the answer are bounded; the page names
no server path in its messages. Nothing is fetched from outside (no analytics, system fonts).
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from eval_mm.chat import Chat, ChatImageError, chat_from_args, draw_boxes
from eval_mm.options import add_model_arguments
from models.errors import ArgumentParser, MissingFileError, UserError, positive_int, run_cli

TITLE = "vlrecipe chat"
MAX_UPLOAD_MB = 20
MAX_QUESTION_CHARS = 2000
MAX_QUEUE = 16  # questions waiting for the model (answers are computed one at a time)
KEEP_UPLOADS_S = 3600  # gradio keeps a closed session's state for an hour too
# What the page says when an uploaded image cannot be used: the same for every cause, with no path in it.
UNREADABLE_UPLOAD = "The uploaded file could not be read as an image. Upload a PNG or JPEG picture."
UNREADABLE_CONVERSATION = (
    "An image of this conversation can no longer be read. Clear the history and upload it again."
)


def _import_gradio():
    try:
        import gradio as gr  # the optional extra [web]: imported only when the demo runs
    except ImportError as e:
        raise UserError('the web demo needs gradio: pip install -e ".[web]"') from e
    return gr


def shown(text: str) -> dict:
    """A question or answer as the chat window shows it: verbatim, <ref>/<box> markup visible (escaped, not
    HTML). A text message, not a plain string: gradio's Chatbot runs inspect.cleandoc over a plain string
    (tabs expanded, indentation and blank first or last lines dropped)."""
    return {"type": "text", "text": html.escape(text, quote=False)}


@dataclass
class Session:
    """One browser session: its conversation, and what its chat window shows. Held on the server only (a
    gradio State), so a client cannot hand the server a chat history that names files."""

    chat: Chat
    messages: list[dict] = field(default_factory=list)


class UploadError(UserError):
    """An upload the page cannot use; the message is the one the page shows."""


def uploaded_path(payload: dict | None, upload_folder: str | Path) -> str | None:
    """The server path of an image the client uploaded (gradio's FileData ``payload``), or None for no image.

    Checked here because gradio's own check covers only payloads marked as FileData: a bare
    ``{"path": "/etc/hostname"}`` from a client reaches the Image component, which opens it. Anything not
    inside the upload folder is refused with one message, whether or not the file exists: the path is
    compared as text before the file system is touched, then again with links resolved."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    folder = Path(upload_folder).resolve()
    if not isinstance(path, str) or not Path(os.path.abspath(path)).is_relative_to(folder):
        raise UploadError(UNREADABLE_UPLOAD)
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise UploadError(UNREADABLE_UPLOAD)
    return str(resolved)


def delete_uploads(session: Session | None, upload_folder: str | Path) -> None:
    """Delete the files a session uploaded (those inside gradio's upload folder): called when it ends."""
    if session is None:
        return
    folder = Path(upload_folder).resolve()
    for path in {*session.chat.images, *session.chat.pending}:
        path = Path(path).resolve()
        if path.is_relative_to(folder):
            path.unlink(missing_ok=True)
    session.chat.reset()


def build_demo(
    new_chat: Callable[[], Chat],
    title: str = TITLE,
    max_question_chars: int = MAX_QUESTION_CHARS,
    keep_uploads_s: int = KEEP_UPLOADS_S,
):
    """The gradio Blocks app. ``new_chat()`` makes the conversation of a new browser session. Questions longer
    than ``max_question_chars`` are refused; uploads are deleted when their session ends, and in any case
    ``keep_uploads_s`` seconds after upload (gradio's ``delete_cache``)."""
    gr = _import_gradio()

    # preprocess=False below: the function gets the client's values as sent (the question a string, the image
    # gradio's FileData dict), so that nothing opens an image path before uploaded_path has checked it.
    def respond(question: str | None, image: dict | None, session: Session | None) -> Iterator[tuple]:
        session = session if session is not None else Session(new_chat())
        chat, messages = session.chat, list(session.messages)
        question = question.strip() if isinstance(question, str) else ""
        if not question:
            raise gr.Error("Type a question first.")
        if len(question) > max_question_chars:
            raise gr.Error(
                f"The question is {len(question)} characters long; at most {max_question_chars} are allowed."
            )
        try:
            image = uploaded_path(image, demo.GRADIO_CACHE)
        except UploadError as e:
            raise gr.Error(str(e)) from e
        if image and image not in chat.images and image not in chat.pending:
            try:
                chat.add_image(image)
            except ChatImageError as e:  # its message names the server's path: say the same for every cause
                raise gr.Error(UNREADABLE_UPLOAD) from e
            messages.append({"role": "user", "content": {"path": image}})
            session.messages = list(
                messages
            )  # the image stays with the conversation even if this question fails
        messages += [{"role": "user", "content": shown(question)}, {"role": "assistant", "content": ""}]
        answer = ""
        yield messages, session, "", gr.skip()
        try:
            for piece in chat.stream(question):
                answer += piece
                messages[-1] = {"role": "assistant", "content": shown(answer)}
                yield messages, session, "", gr.skip()
        except ChatImageError as e:  # an image uploaded earlier, deleted since (--keep-uploads-s)
            raise gr.Error(UNREADABLE_CONVERSATION) from e
        except UserError as e:  # a full context: the message names no file
            raise gr.Error(str(e)) from e
        reply = chat.last_reply
        messages[-1] = {"role": "assistant", "content": shown(reply.text)}
        session.messages = messages
        drawn = draw_boxes(reply.image, reply.boxes) if reply.image else None
        yield messages, session, "", drawn

    def clear(session: Session | None) -> tuple:
        if session is not None:
            session.chat.reset()
            session.messages = []
        return [], session, "", None, None

    # delete_cache=(how often to look, how old a file may be), in seconds;
    # everything goes when the server stops.
    with gr.Blocks(
        title=title, analytics_enabled=False, delete_cache=(min(600, keep_uploads_s), keep_uploads_s)
    ) as demo:
        gr.Markdown(
            f"## {title}\nUpload an image, ask about it. Boxes the model names are drawn on the right."
        )
        session = gr.State(None, delete_callback=lambda s: delete_uploads(s, demo.GRADIO_CACHE))
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="conversation", elem_id="chatbot", height=420, render_markdown=False
                )
                question = gr.Textbox(
                    placeholder="Ask about the image and press Enter",
                    show_label=False,
                    elem_id="question",
                    max_length=max_question_chars,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear history", elem_id="clear")
            with gr.Column(scale=2):
                image = gr.Image(
                    type="filepath", sources=["upload"], label="image", elem_id="image", height=260
                )
                boxes = gr.Image(label="grounded boxes", interactive=False, elem_id="boxes", height=260)
        # The chat window is an output only: what it shows comes from the session, never from the client.
        inputs, outputs = [question, image, session], [chatbot, session, question, boxes]
        send.click(respond, inputs, outputs, api_name="respond", preprocess=False)
        question.submit(
            respond, inputs, outputs, preprocess=False, api_visibility="undocumented"
        )  # the same as /respond
        clear_button.click(clear, [session], [chatbot, session, question, boxes, image], api_name="clear")
        chatbot.clear(
            clear,
            [session],
            [chatbot, session, question, boxes, image],  # the chat's bin icon
            api_visibility="undocumented",
        )
    return demo


def local_theme():
    """gradio's default theme on system fonts: the page loads nothing from outside."""
    gr = _import_gradio()
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


# ------------------------------------------------------------------------------------- launching
def _credentials(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:  # the message never repeats the text: it may be a password
        raise UserError(f"{where}: expected USER:PASSWORD, a user and a password separated by ':'")
    return user, password


def read_auth(pairs: list[str], files: list[str]) -> list[tuple[str, str]]:
    """The logins of ``--auth USER:PASS`` and of ``--auth-file FILE`` (a ``USER:PASS`` a line; blank lines and
    ``#`` comments skipped). A malformed entry is a UserError naming it (never the password)."""
    logins = [_credentials(p, "--auth") for p in pairs]
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise MissingFileError(f"--auth-file {path}: file not found")
        lines = [
            (n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        ]
        in_file = [
            _credentials(line, f"--auth-file {path}, line {n}")
            for n, line in lines
            if line and not line.startswith("#")
        ]
        if not in_file:
            raise UserError(f"--auth-file {path}: no USER:PASSWORD line")
        logins += in_file
    return logins


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: localhost, 127.x.x.x, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, share: bool, logins: list) -> None:
    """Refuse to serve beyond this machine (a non-loopback ``--host``, or ``--share``) without a login."""
    if logins:
        return
    if share:
        raise UserError(
            "--share makes a public link, and the demo has no login: add --auth USER:PASS or "
            "--auth-file FILE (docs/chat.md)"
        )
    if not is_loopback(host):
        raise UserError(
            f"--host {host} serves the demo to the network without a login: add --auth USER:PASS or "
            "--auth-file FILE (and TLS in front, docs/chat.md), or serve on --host 127.0.0.1"
        )


def build_parser(prog: str = "python -m eval_mm.web") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        examples=["--checkpoint runs/demo/sft/final", "--checkpoint runs/my_lora/final --port 8080"],
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1; any other needs --auth or --auth-file)",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--share",
        action="store_true",
        help="also make gradio's public share link (needs --auth or --auth-file; off by default)",
    )
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASS",
        help="a login (repeatable); prefer --auth-file: a command line is visible to other users",
    )
    parser.add_argument(
        "--auth-file", action="append", default=[], metavar="FILE", help="a file of logins, USER:PASS a line"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=MAX_UPLOAD_MB,
        help=f"largest upload accepted (default {MAX_UPLOAD_MB})",
    )
    parser.add_argument(
        "--max-question-chars",
        type=positive_int,
        default=MAX_QUESTION_CHARS,
        help=f"longest question accepted (default {MAX_QUESTION_CHARS})",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=MAX_QUEUE,
        help=f"questions that may wait for the model; more are turned away (default {MAX_QUEUE})",
    )
    parser.add_argument(
        "--keep-uploads-s",
        type=positive_int,
        default=KEEP_UPLOADS_S,
        help=f"delete an upload this long after it arrived, if its session has not ended "
        f"before (default {KEEP_UPLOADS_S})",
    )
    return parser


def serve(args: argparse.Namespace, block: bool = True):
    """Load the model and serve the page as ``args`` say; returns the running gradio app (``block=False``:
    at once, else when the server stops). Refuses an exposed launch without a login before
    loading anything."""
    _import_gradio()  # fail with the install hint before the model loads
    logins = read_auth(args.auth, args.auth_file)
    check_exposure(args.host, args.share, logins)
    template = chat_from_args(args)  # loads the model once; every session gets a Chat over it

    def new_chat() -> Chat:
        return template.new_conversation()

    demo = build_demo(
        new_chat, max_question_chars=args.max_question_chars, keep_uploads_s=args.keep_uploads_s
    )
    login = f", login required ({len(logins)} user{'s' if len(logins) != 1 else ''})" if logins else ""
    print(
        f"serving {args.checkpoint} ({template.prompt_format} prompts) on http://{args.host}:{args.port}{login}",
        flush=True,
    )
    # share passed explicitly: gradio would otherwise turn it on by itself (GRADIO_SHARE, hosted notebooks).
    # show_error=False: the page shows only the messages of gr.Error, never an exception's text (paths).
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=logins or None,
        max_file_size=args.max_upload_mb * 1024 * 1024,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=not block,
        theme=local_theme(),
        footer_links=[],
        mcp_server=False,
        ssr_mode=False,
    )
    return demo


def main(argv: list[str] | None = None, prog: str = "python -m eval_mm.web") -> int:
    serve(build_parser(prog).parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
