"""A web page to chat with a checkpoint about images (gradio, the optional extra ``[web]``):

    python -m eval_mm.web --checkpoint runs/demo/sft/final [--base DIR] [--host 127.0.0.1] [--port 7860]

Upload an image, ask; the answer streams in, and its grounded boxes (``<ref>..</ref><box>..</box>``) are drawn
on the image beside the chat. "Clear history" starts over. Every browser session has its own conversation:
an ``eval_mm.chat.Chat`` (the same logic as ``python -m eval_mm chat``) over one shared model. Serves on
127.0.0.1 unless ``--host`` says otherwise; nothing is fetched from outside (no analytics, system fonts).
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Callable, Iterator

from eval_mm.chat import Chat, add_model_arguments, chat_from_args, draw_boxes
from models.errors import ArgumentParser, UserError, run_cli

TITLE = "vlrecipe chat"


def _import_gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise UserError('the web demo needs gradio: pip install -e ".[web]"') from e
    return gr


def shown(answer: str) -> str:
    """An answer as the chat window shows it: verbatim, <ref>/<box> markup visible (escaped, not HTML)."""
    return html.escape(answer, quote=False)


def build_demo(new_chat: Callable[[], Chat], title: str = TITLE):
    """The gradio Blocks app. ``new_chat()`` makes the conversation of a new browser session."""
    gr = _import_gradio()

    def respond(question: str, image: str | None, chat: Chat | None, messages: list) -> Iterator[tuple]:
        chat = chat if chat is not None else new_chat()
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question first.")
        messages = list(messages or [])
        try:
            if image and image not in chat.images and image not in chat.pending:
                chat.add_image(image)
                messages.append({"role": "user", "content": {"path": image}})
            messages += [{"role": "user", "content": shown(question)}, {"role": "assistant", "content": ""}]
            answer = ""
            yield messages, chat, "", gr.skip()
            for piece in chat.stream(question):
                answer += piece
                messages[-1] = {"role": "assistant", "content": shown(answer)}
                yield messages, chat, "", gr.skip()
        except UserError as e:
            raise gr.Error(str(e)) from e
        reply = chat.last_reply
        messages[-1] = {"role": "assistant", "content": shown(reply.text)}
        drawn = draw_boxes(reply.image, reply.boxes) if reply.image else None
        yield messages, chat, "", drawn

    def clear(chat: Chat | None) -> tuple:
        if chat is not None:
            chat.reset()
        return [], chat, "", None, None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\nUpload an image, ask about it. Boxes the model names are drawn on the right.")
        chat_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", elem_id="chatbot", height=420, render_markdown=False)
                question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False,
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear history", elem_id="clear")
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", sources=["upload"], label="image", elem_id="image", height=260)
                boxes = gr.Image(label="grounded boxes", interactive=False, elem_id="boxes", height=260)
        inputs, outputs = [question, image, chat_state, chatbot], [chatbot, chat_state, question, boxes]
        send.click(respond, inputs, outputs)
        question.submit(respond, inputs, outputs)
        clear_button.click(clear, [chat_state], [chatbot, chat_state, question, boxes, image])
        chatbot.clear(clear, [chat_state], [chatbot, chat_state, question, boxes, image])  # its own bin icon
    return demo


def local_theme():
    """gradio's default theme on system fonts: the page loads nothing from outside."""
    gr = _import_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m eval_mm.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    _import_gradio()  # fail with the install hint before the model loads
    template = chat_from_args(args)  # loads the model once; every session gets a Chat over it

    def new_chat() -> Chat:
        return Chat(template.model, template.tokenizer, prompt_format=template.prompt_format, system=template.system,
                    settings=template.settings)

    demo = build_demo(new_chat)
    print(f"serving {args.checkpoint} ({template.prompt_format} prompts) on http://{args.host}:{args.port}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=local_theme(), show_error=True,
                        footer_links=[])
    return 0


if __name__ == "__main__":
    run_cli(main)
