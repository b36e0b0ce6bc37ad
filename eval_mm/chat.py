"""Talk to a trained model about images: the library behind ``python -m eval_mm chat`` and the web demo.

    chat = Chat.from_pretrained("runs/demo/sft/final")
    reply = chat.ask("What colour is the circle?", images=["cat.png"])
    reply.text, reply.boxes                      # boxes: <ref>..</ref><box>..</box> of the answer

A ``Chat`` keeps the conversation (the Qwen-VL fine-tune format: ``{"from": "user"|"assistant", "value"}``
turns) and renders the whole of it for every question, with the checkpoint's prompt format:

* ``chatml`` (after SFT): ``data.chatml.encode_conversation_prompt``, the renderer training uses, so the
  prompt of turn k is exactly the prefix of the training sample the saved conversation becomes. Images
  are written ``Picture n: <img>path</img>\\n`` before the question (the reference's ``from_list_format``),
  n counting the conversation's images from 1.
* ``raw`` (pretrain / multitask checkpoints): the text as is, images as ``<img>path</img>`` before it (as
  the multitask templates and the reference's base-model prompts write them), earlier turns and answers
  concatenated.

Images come only as arguments (``images=``, ``add_image``): the question's text is never parsed for
``<img>PATH</img>``, and the special tokens typed in it (``<|im_end|>``, ``<img>``, ...) are plain text
(``data.text.Message``); only the grounding markup ``<ref>``/``<box>``/``<quad>`` is read. The same holds
for the model's answers when they are fed back as context.

Decoding is greedy unless sampling is asked for (temperature > 0, top_p or top_k), always with the KV
cache (``VLM.generate``); tokens are streamed through a transformers streamer as they are generated.

A Hugging Face family model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; ``models.load_pretrained`` gives it with its
processor) is prompted with its own chat template and image processor (eval_mm.family), its images as the
template's image items; a typed ``<ref>``/``<box>`` is rewritten into the family's box convention, and the
boxes of its answers come back from that convention into ours (``Reply.boxes``, drawing); ``Reply.text`` is
its own text. The family's control tokens (``<|im_end|>``, ``<|vision_start|>``, ...) cannot be typed: its
template renders a conversation as one string, so a question holding one is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from data.chatml import DEFAULT_SYSTEM_MESSAGE, encode_conversation_prompt
from data.hf_encode import encode_images
from data.image_files import ImageLoadError, decode_image, image_size_of
from data.images import load_image
from data.text import COORD_RANGE, Message, TypedMarkupError, encode_text_with_images, markup_spelt_out
from eval_mm.family import check_family_prompt_format, encode_family_prompt, family_answer
from eval_mm.inference import stop_token_ids
from eval_mm.prompts import checkpoint_prompt_format
from models.errors import UserError
from models.loading import base_vlm, is_family_model, load_pretrained, pick_device, resolve_export
from models.tokens import BOX_END, BOX_START, IMG_END, IMG_START, REF_END, REF_START

# A <ref> phrase followed by one or more boxes, or a box on its own (ref None).
_GROUNDING = re.compile(
    rf"(?:{re.escape(REF_START)}(?P<ref>.*?){re.escape(REF_END)}\s*)?"
    rf"(?P<boxes>(?:{re.escape(BOX_START)}\(\d+,\d+\),\(\d+,\d+\){re.escape(BOX_END)}\s*)+)",
    re.DOTALL,
)
_BOX = re.compile(rf"{re.escape(BOX_START)}\((\d+),(\d+)\),\((\d+),(\d+)\){re.escape(BOX_END)}")


# ----------------------------------------------------------------------------------------- results
@dataclass
class GroundedBox:
    """One box of an answer: ``box`` on the 0-1000 scale of the text, ``box_pixels`` in pixels of the
    image (x / 1000 * width, docs/design.md "Box convention"), None when there is no image."""

    ref: str | None
    box: tuple[int, int, int, int]
    box_pixels: tuple[float, float, float, float] | None = None


@dataclass
class Reply:
    text: str  # the answer, <ref>/<box> markup kept, stop tokens removed
    boxes: list[GroundedBox] = field(default_factory=list)
    image: str | None = None  # the image the pixel boxes are on: the conversation's last

    def to_json(self) -> dict:
        """``{"answer", "boxes": [{"ref", "box", "box_pixels"}]}`` (the CLI's --json line)."""
        return {"answer": self.text, "boxes": [asdict(b) for b in self.boxes]}


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[GroundedBox]:
    """Every ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` of ``text`` (several boxes after one phrase
    share it; a box without a phrase has ref None). ``image_size`` = (width, height) adds pixel boxes."""
    found = []
    for match in _GROUNDING.finditer(text):
        ref = match.group("ref")
        for box in _BOX.finditer(match.group("boxes")):
            coords = tuple(int(v) for v in box.groups())
            pixels = None
            if image_size is not None:
                w, h = image_size
                pixels = tuple(round(v / COORD_RANGE * s, 1) for v, s in zip(coords, (w, h, w, h)))
            found.append(GroundedBox(ref.strip() if ref is not None else None, coords, pixels))
    return found


_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


DRAW_MIN_SIDE = 448  # smaller images are enlarged before drawing, so that labels stay readable


def draw_boxes(image_path: str | Path, boxes: list[GroundedBox], out: str | Path | None = None):
    """The image with each box drawn as a labelled rectangle (its ref, or its index); saved to ``out`` when
    given. An image whose shorter side is under DRAW_MIN_SIDE pixels is enlarged first.
    Returns the PIL image."""
    canvas = decode_image(image_path)  # the same checks as every image read (pixel cap, allowed formats)
    w, h = canvas.size
    if min(w, h) < DRAW_MIN_SIDE:
        scale = DRAW_MIN_SIDE / min(w, h)
        w, h = round(w * scale), round(h * scale)
        canvas = canvas.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(w, h) / 150))
    font = ImageFont.load_default(size=max(12, round(min(w, h) / 25)))
    for i, b in enumerate(boxes):
        colour = _COLOURS[i % len(_COLOURS)]
        x1, y1, x2, y2 = (v / COORD_RANGE * s for v, s in zip(b.box, (w, h, w, h)))
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=line)
        label = b.ref if b.ref else f"box {i + 1}"
        left, top, right, bottom = draw.textbbox((min(x1, x2), min(y1, y2)), label, font=font)
        shift = min(bottom - top + 2 * line, min(y1, y2))  # above the box when there is room
        draw.rectangle([left, top - shift, right + 2 * line, bottom - shift], fill=colour)
        draw.text((min(x1, x2) + line, min(y1, y2) - shift), label, fill="white", font=font)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out)
    return canvas


# -------------------------------------------------------------------------------------- decoding
@dataclass
class GenerationSettings:
    """Greedy unless ``temperature`` > 0, ``top_p`` or ``top_k`` asks for sampling (temperature 1 then,
    unless given); ``temperature`` 0 forces greedy. ``seed`` makes sampling reproducible: the generator is
    re-seeded before every answer. ``repetition_penalty`` sees the answer's tokens (generation starts
    from embeddings, so the prompt's ids are not part of what transformers penalises)."""

    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        if self.temperature == 0:
            return False
        return self.temperature is not None or self.top_p is not None or self.top_k is not None

    def generate_kwargs(self) -> dict:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sampling, "num_beams": 1}
        if self.sampling:
            kwargs.update(
                temperature=self.temperature or 1.0,
                top_p=self.top_p if self.top_p is not None else 1.0,
                top_k=self.top_k if self.top_k is not None else 0,
            )
        else:  # a checkpoint's generation_config may hold sampling values: greedy ignores them, say so to HF
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


class AnswerStreamer(TextIteratorStreamer):
    """transformers' TextIteratorStreamer, keeping special tokens (an answer's <ref>/<box> are special tokens)
    and dropping the stop tokens generation ends with."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.stop_ids = torch.tensor(stop_ids)

    def put(self, value: torch.Tensor) -> None:
        if (
            self.skip_prompt and self.next_tokens_are_prompt
        ):  # the (empty) prompt: generation starts from embeddings
            return super().put(value)
        kept = value.reshape(-1).cpu()
        kept = kept[~torch.isin(kept, self.stop_ids)]
        if kept.numel():
            super().put(kept)


class StopWhenAsked(StoppingCriteria):
    """Ends generation when the reader of a stream has gone away (``event`` set)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


# ------------------------------------------------------------------------------------------ chat
class ChatImageError(UserError):
    """An image given to the chat that cannot be used (missing, not an image, a path holding <img>). The
    message names the path: the terminal shows it, the web page shows a message of its own instead."""


class Chat:
    """A conversation with a VLM (see the module docstring). ``model`` is a VLM (or a peft model around one)
    on its device; ``prompt_format`` is "chatml" or "raw" (``Chat.from_pretrained`` reads the checkpoint's).
    For a family model, ``tokenizer`` is its processor (what ``models.load_pretrained`` returns)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        prompt_format: str = "chatml",
        system: str | None = None,
        settings: GenerationSettings | None = None,
    ):
        if prompt_format not in ("chatml", "raw"):
            raise UserError(f"prompt format must be 'chatml' or 'raw', got {prompt_format!r}")
        self.model = model
        self.vlm = base_vlm(model)
        self.family = is_family_model(model)
        self.processor = None  # a family's processor: its chat template and image processor
        if self.family:
            check_family_prompt_format(prompt_format)
            if tokenizer is None:
                raise UserError("Chat with a family model needs its processor (from models.load_pretrained)")
            self.processor, tokenizer = tokenizer, tokenizer.tokenizer
        self.tokenizer = tokenizer if tokenizer is not None else self.vlm.tokenizer
        if self.tokenizer is None:
            raise UserError("Chat needs a tokenizer: pass one, or load the model with models.load_pretrained")
        self.prompt_format = prompt_format
        self.system_given = system  # a family's template has its own default (Qwen3-VL: none)
        self.system = system if system is not None else DEFAULT_SYSTEM_MESSAGE
        self.settings = settings or GenerationSettings()
        self.history: list[dict] = []  # {"from": "user"|"assistant", "value": Message}
        self.images: list[str] = []  # every image of the conversation, in order
        self.pending: list[str] = []  # images added for the next question
        self.last_reply: Reply | None = None

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        base: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        prompt_format: str = "auto",
        **kwargs,
    ) -> Chat:
        """Load any export with ``models.load_pretrained`` and chat in the prompt format it records."""
        model, tokenizer = load_pretrained(checkpoint, base=base, dtype=dtype, device=pick_device(device))
        if prompt_format == "auto":
            prompt_format = checkpoint_prompt_format(resolve_export(checkpoint).path)
        return cls(model, tokenizer, prompt_format=prompt_format, **kwargs)

    def new_conversation(self) -> Chat:
        """Another conversation with the same model, prompt format, system message and settings (the web
        demo's sessions)."""
        return Chat(
            self.model,
            self.processor or self.tokenizer,
            prompt_format=self.prompt_format,
            system=self.system_given,
            settings=self.settings,
        )

    # ------------------------------------------------------------------------------ conversation
    def add_image(self, path: str | Path) -> int:
        """Queue an image for the next question; returns its number in the conversation (1-based)."""
        path = os.path.abspath(os.path.expanduser(str(path)))  # the saved conversation must find it later
        if IMG_START in path or IMG_END in path:  # :save writes <img>path</img>, which must read back whole
            raise ChatImageError(f"an image path cannot hold {IMG_START} or {IMG_END}: {path}")
        try:
            image_size_of(path)
        except ImageLoadError as e:
            raise ChatImageError(str(e)) from e
        self.pending.append(path)
        return len(self.images) + len(self.pending)

    def reset(self) -> None:
        """Forget the conversation (the settings and system message stay)."""
        self.history, self.images, self.pending, self.last_reply = [], [], [], None

    def conversation(self) -> list[dict]:
        """The turns so far as written text (``<img>path</img>`` for images), with a leading system turn when
        it is not the default: the Qwen-VL fine-tune conversation that training reads."""
        system = [] if self.system == DEFAULT_SYSTEM_MESSAGE else [{"from": "system", "value": self.system}]
        return system + [{"from": t["from"], "value": t["value"].written()} for t in self.history]

    def save(self, path: str | Path) -> Path:
        """Write the conversation as a Qwen-VL fine-tune JSON file (a list of one record), ready for training
        (``data.paths=[FILE]``). Images are absolute paths. Written atomically. Refused when a turn holds
        a special token as plain text (a typed ``<|im_end|>``): training would read it as the token."""
        if not self.history:
            raise UserError("nothing to save yet: ask something first")
        for n, turn in enumerate(self.history, start=1):
            spelt = markup_spelt_out(self.tokenizer, turn["value"].text)
            if spelt:
                raise UserError(
                    f"cannot save the conversation as training data: turn {n} ({turn['from']}) holds "
                    f"{', '.join(spelt)} as plain text, which training data reads as markup"
                )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps([{"id": "chat", "conversations": self.conversation()}], indent=2, ensure_ascii=False)
            + "\n",
            encoding="utf-8",
        )
        tmp.replace(path)
        return path

    def _user_message(self, text: str, new_images: list[str]) -> Message:
        """The user turn: the new images (chatml: ``Picture n: <img>path</img>\n`` each),
        then the typed text."""
        pieces: list[tuple[str, str]] = []
        for n, path in enumerate(new_images, start=len(self.images) + 1):
            if self.family:  # the template's image items, numbered by the template (add_vision_id) if at all
                pieces.append(("image", path))
            elif self.prompt_format == "chatml":
                pieces += [("text", f"Picture {n}: "), ("image", path), ("text", "\n")]
            else:
                pieces.append(("image", path))
        return Message((*pieces, ("text", text)))

    def encode(self, turns: list[dict]) -> tuple[list[int], list[str]]:
        """Prompt ids (ending where the answer starts) and image paths for ``turns`` ending in a user turn."""
        num_image_tokens = self.vlm.config.num_image_tokens
        if self.prompt_format == "chatml":
            return encode_conversation_prompt(self.tokenizer, turns, num_image_tokens, self.system)
        ids: list[int] = []
        paths: list[str] = []
        for turn in turns:
            turn_ids, turn_paths = encode_text_with_images(self.tokenizer, turn["value"], num_image_tokens)
            ids += turn_ids
            paths += turn_paths
        return ids, paths

    # ---------------------------------------------------------------------------------- asking
    def ask(self, text: str, images: Iterable[str | Path] = (), on_text=None) -> Reply:
        """Answer ``text`` about ``images`` (added before it) and the conversation so far; keeps history.
        ``text`` is plain text: an ``<img>PATH</img>`` or ``<|im_end|>`` in it is read as those characters.
        ``on_text(piece)`` is called with each piece of text as it is generated."""
        for piece in self.stream(text, images):
            if on_text is not None:
                on_text(piece)
        assert self.last_reply is not None
        return self.last_reply

    def stream(self, text: str, images: Iterable[str | Path] = ()) -> Iterator[str]:
        """Like ``ask``, yielding the answer's text piece by piece; the Reply is ``self.last_reply`` after."""
        queued = list(self.pending)
        try:
            for image in images:
                self.add_image(image)
            yield from self._answer(text)
        except BaseException:
            self.pending = queued  # images of a failed question are not kept; those queued before stay
            raise

    def _prompt(self, turns: list[dict]) -> tuple[list[int], dict[str, torch.Tensor], object]:
        """(prompt ids, the model's image inputs on its device, what the answer's boxes refer to) of ``turns``
        ending in a user turn. For a family: the geometry of the last image (eval_mm.family)."""
        device = next(self.model.parameters()).device
        if self.family:
            return self._family_prompt(turns, device)
        try:
            ids, paths = self.encode(turns)
        except TypedMarkupError as e:  # a control token this tokenizer cannot spell out as text
            raise UserError(f"cannot use this message: {e}") from e
        dtype = next(self.vlm.resampler.parameters()).dtype
        size = self.vlm.config.vision.image_size
        try:
            pixels = (
                torch.stack([load_image(p, size) for p in paths]) if paths else torch.zeros(0, 3, size, size)
            )
        except ImageLoadError as e:  # an image of the conversation was removed or damaged since
            raise ChatImageError(str(e)) from e
        return ids, {"pixel_values": pixels.to(device, dtype)}, None

    def _family_prompt(self, turns: list[dict], device: torch.device) -> tuple[list[int], dict, object]:
        for turn in turns:
            spelt = markup_spelt_out(self.tokenizer, turn["value"].text) if turn["from"] == "user" else []
            if spelt:
                raise UserError(
                    f"cannot use this message: {', '.join(spelt)} is a control token of this "
                    "model and cannot be typed as text"
                )
        try:
            prompt = encode_family_prompt(
                self.processor,
                self.vlm.spec.box_convention,
                [(t["from"], list(t["value"].pieces)) for t in turns],
                "the chat",
                system=self.system_given,
            )
        except ImageLoadError as e:  # an image of the conversation was removed or damaged since
            raise ChatImageError(str(e)) from e
        except ValueError as e:  # a box the family's convention cannot carry
            raise UserError(f"cannot use this message: {e}") from e
        encoded = encode_images(self.processor, prompt.images)
        images = {key: value.to(device) for key, value in encoded.items()}
        if "pixel_values" in images:
            images["pixel_values"] = images["pixel_values"].to(self.vlm.hf.dtype)
        return prompt.ids, images, prompt.geometry

    def _context_length(self) -> int | None:
        if self.family:
            return self.vlm.config.get_text_config().max_position_embeddings
        return self.vlm.config.text_config.get("max_position_embeddings")

    def _answer(self, text: str) -> Iterator[str]:
        new_images = list(self.pending)
        user_turn = {"from": "user", "value": self._user_message(text, new_images)}
        ids, images, geometry = self._prompt(self.history + [user_turn])
        context = self._context_length()
        if context is not None and len(ids) >= context:
            raise UserError(
                f"the conversation is {len(ids)} tokens, the model's context {context}: :reset (or "
                "Chat.reset()) and ask again"
            )
        settings = self.settings
        kwargs = settings.generate_kwargs()
        if context is not None:
            kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], context - len(ids))

        device = next(self.model.parameters()).device
        stops = stop_token_ids(self.tokenizer, self.prompt_format)
        streamer = AnswerStreamer(self.tokenizer, stops)
        stop = StopWhenAsked()
        result: dict = {}

        def generate() -> None:
            try:
                if settings.seed is not None and settings.sampling:
                    torch.manual_seed(settings.seed)
                result["ids"] = self.model.generate(
                    torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                    **images,
                    pad_token_id=stops[0],
                    eos_token_id=stops,
                    use_cache=True,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([stop]),
                    **kwargs,
                )
            except BaseException as e:  # re-raised in the caller's thread below
                result["error"] = e
                streamer.end()

        # generate() runs in a thread so this one can hand out text while it is produced
        # (TextIteratorStreamer).
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.event.set()  # the reader stopped early (a closed generator): end generation now
            worker.join()
        if "error" in result:
            raise result["error"]
        answer_ids = [t for t in result["ids"][0].tolist() if t not in stops]
        if self.family:  # image placeholders the model wrote would claim images in the next prompt
            placeholder = self.vlm.placeholder
            span_ids = (placeholder.start, placeholder.pad, placeholder.end)
            answer_ids = [t for t in answer_ids if t not in span_ids]
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        # Raw prompts continue the text, so the answer keeps its leading space in the history; shown stripped.
        stored = answer if self.prompt_format == "raw" else answer.strip()
        # The answer is context for the next question as typed text: an <img>PATH</img> the model was led to
        # write must not make the next prompt read PATH.
        self.history += [user_turn, {"from": "assistant", "value": Message((("text", stored),))}]
        self.images += new_images
        self.pending = []
        image = self.images[-1] if self.images else None
        if self.family:  # the boxes of the family's convention, in ours
            convention = self.vlm.spec.box_convention
            answer_with_our_boxes, _ = family_answer(self.tokenizer, answer_ids, stops, convention, geometry)
        else:
            answer_with_our_boxes = answer
        boxes = parse_grounding(answer_with_our_boxes, image_size_of(image) if image else None)
        self.last_reply = Reply(answer.strip(), boxes, image)

    def draw(self, out: str | Path):
        """Draw the last answer's boxes on the conversation's last image (``--draw``)."""
        reply = self.last_reply
        if reply is None or reply.image is None:
            raise UserError("nothing to draw: no image in the conversation yet")
        return draw_boxes(reply.image, reply.boxes, out)


# ------------------------------------------------------------------------------ command line
def chat_from_args(args: argparse.Namespace) -> Chat:
    """A Chat from the options ``add_model_arguments`` declares."""
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    return Chat.from_pretrained(
        args.checkpoint,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        prompt_format=args.prompt_format,
        system=args.system,
        settings=settings,
    )


HELP = """commands: :image PATH [PATH ...]  add images to your next message
          :reset  start over    :save FILE  write the conversation (Qwen-VL JSON, for training)
          :quit   leave (or end of input)    :help  this text"""


def one_shot(
    chat: Chat, prompt: str, images: list[str], out: TextIO, as_json: bool = False, draw: str | None = None
) -> Reply:
    """Answer once: stream the answer to ``out`` (or print only the JSON line with ``as_json``)."""
    reply = chat.ask(
        prompt, images=images, on_text=None if as_json else lambda p: print(p, end="", file=out, flush=True)
    )
    if draw:
        chat.draw(draw)
    if as_json:
        print(json.dumps(reply.to_json(), ensure_ascii=False), file=out, flush=True)
    else:
        print(file=out, flush=True)
    return reply


def interactive(chat: Chat, lines: Iterable[str], out: TextIO, draw: str | None = None) -> None:
    """A multi-turn session read line by line from ``lines`` (stdin): questions and ``:`` commands; answers
    are streamed to ``out``. A mistake (a missing image, a full context) prints ``error: ...`` and the
    session goes on."""
    print(f"chat ({chat.prompt_format} prompts). Type a question; {HELP}", file=out, flush=True)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        answering = False
        try:
            if line.startswith(":"):
                if not _command(chat, line, out):
                    return
                continue
            answering = True
            print("assistant: ", end="", file=out, flush=True)
            chat.ask(line, on_text=lambda piece: print(piece, end="", file=out, flush=True))
            print(file=out, flush=True)
            if draw and chat.last_reply and chat.last_reply.image:
                chat.draw(draw)
                print(f"(boxes drawn on {chat.last_reply.image}: {draw})", file=out, flush=True)
        except UserError as e:
            print(("\n" if answering else "") + f"error: {e}", file=out, flush=True)


def _command(chat: Chat, line: str, out: TextIO) -> bool:
    """Run one ``:command``; False when the session ends."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in (":quit", ":exit", ":q"):
        return False
    if name == ":image":
        paths = shlex.split(rest)
        if not paths:
            raise UserError(":image needs a path")
        for path in paths:
            n = chat.add_image(path)
            print(f"(image {n}: {path}, goes with your next message)", file=out, flush=True)
    elif name == ":reset":
        chat.reset()
        print("(conversation cleared)", file=out, flush=True)
    elif name == ":save":
        if not rest:
            raise UserError(":save needs a file name")
        print(f"(saved {chat.save(rest)})", file=out, flush=True)
    elif name == ":help":
        print(HELP, file=out, flush=True)
    else:
        raise UserError(f"unknown command {name}; {HELP}")
    return True
