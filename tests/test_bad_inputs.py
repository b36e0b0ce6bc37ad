"""The bad-input corpus (issue 27): every input that once hurt a command, with what each command must do
with it now. An input is one row of ``CASES``; what it must cause is an ``Outcome`` per surface (a
command): one ``error:`` line naming the file, the record and the field, with exit status 2; or a counted
skip or warning (exit 0, the count in the output); or, for data.check, a failing report that lists it
(exit 1). No surface may print a traceback, whatever the input.

To add a bug found later: write a builder of the input (a function of an empty folder that writes the
file and returns its path), then one ``Case`` with the outcome on each surface that reads that kind of
input. A new surface adds one entry to ``SURFACES``.

Speed: every case of a surface runs in ONE Python process (``run_cases``, the ``__main__`` of this file),
through ``runpy.run_module`` exactly as ``python -m MODULE ARGS`` runs it, each with its own argv,
captured stdout/stderr and exit status; so Python and torch start once per surface, not once per case.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from models import build_vlm, load_pretrained, presets
from models.manifest import MANIFEST
from tests.conftest import build_tiny_tokenizer
from tests.test_checkpoint_trust import add, delete, flip_byte, replace_text, truncate
from tests.test_cli_errors import write_vqa_root
from tests.test_data_images import png_claiming
from train.checkpoint import export_final
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.recipe import FreezeSection, LoraSection

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ inputs


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def writes(name: str, content: bytes | str | Callable[[], bytes | str]) -> Callable[[Path], Path]:
    """A builder writing ``content`` (or what calling it returns) to folder/name."""

    def build(folder: Path) -> Path:
        value = content() if callable(content) else content
        path = folder / name
        path.write_bytes(value if isinstance(value, bytes) else value.encode())
        return path

    return build


def chat(user: str, answer: str = "it is red") -> dict:
    return {"conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]}


GOOD_IMAGE = "@GOOD_IMAGE@"  # in a record: stands for a good image, written next to the data file


def good_image(folder: Path) -> Path:
    path = folder / "good.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def llava(*turns: tuple[str, object], image: object = GOOD_IMAGE) -> dict:
    return {"image": image, "conversations": [{"from": role, "value": value} for role, value in turns]}


def records(*bad: object, suffix: str = ".json") -> Callable[[Path], Path]:
    """A data file of four good chat records followed by ``bad`` (record 4, or line 5, onwards)."""

    def build(folder: Path) -> Path:
        path = folder / f"data{suffix}"
        rows = [*(chat(f"<img>{GOOD_IMAGE}</img>What colour is {i}?") for i in range(4)), *bad]
        text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
        path.write_text(text.replace(GOOD_IMAGE, str(good_image(folder))))
        return path

    return build


# Checkpoint inputs: a damaged copy of something the project wrote, each pristine source made once per
# process in a temporary folder: "export" (VLM.save_pretrained of the tiny model), "adapter" (a LoRA run's
# final/adapter on it, by train.checkpoint.export_final) and "checkpoint" (a tiny run stopped after step 2
# of RESUME_STEPS, with checkpoints at steps 1 and 2, its data and tokenizer beside it).
RESUME_STEPS = 3


def resume_args(train_folder: Path) -> list[str]:
    """``python -m train`` arguments of the run in ``train_folder`` (its checkpoints, data and tokenizer)."""
    return [
        str(REPO / "recipes" / "tiny" / "pretrain.yaml"),
        f"model.tokenizer_path={train_folder / 'tokenizer'}",
        f"data.paths=[{train_folder / 'data.json'}]",
        f"checkpoint.out_dir={train_folder / 'run'}",
        f"train.steps={RESUME_STEPS}",
        "checkpoint.every=1",
        "data.check=off",
        "log.progress_bar=false",
    ]


@cache
def pristine(source: str) -> Path:
    root = Path(_sources().name)
    if source == "export":
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(0)
        model = build_vlm(presets.tiny(vocab_size=len(tokenizer)), tokenizer=tokenizer)
        model.save_pretrained(root / "export")
        return root / "export"
    if source == "adapter":
        model, _ = load_pretrained(pristine("export"))
        freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="train")
        apply_freezing(model, freeze)
        model = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8, dropout=0.0), freeze)
        engine = SimpleNamespace(mode="single", model=model, dist=SimpleNamespace(is_main=True))
        info = {"stage": "sft", "prompt_format": "chatml", "steps": 1, "init_from": str(pristine("export"))}
        return export_final(engine, root / "lora" / "final", info)  # final/adapter
    folder = root / "train"
    folder.mkdir()
    build_tiny_tokenizer().save_pretrained(folder / "tokenizer")
    records()(folder)  # folder/data.json
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "train", *resume_args(folder), "train.stop_after_steps=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "run" / "checkpoints" / "step_000002"


@cache
def _sources() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="vlrecipe_bad_inputs_")  # removed when the process ends


def damaged(source: str, damage: Callable[[Path], None], manifest: bool = True) -> Callable[[Path], Path]:
    """A builder: a copy of the pristine ``source`` (without its manifest unless ``manifest``), damaged."""

    def build(folder: Path) -> Path:
        original = pristine(source)
        # Copied with what lies around it: an adapter's final/ (training_info.json names its base), a
        # checkpoint's run, data and tokenizer (the resume surfaces read them: resume_args).
        around = {"export": original, "adapter": original.parent, "checkpoint": original.parents[2]}[source]
        copy = folder / around.name
        shutil.copytree(around, copy)
        target = copy / original.relative_to(around)
        if not manifest:
            (target / MANIFEST).unlink()
        damage(target)
        return target

    return build


def damaged_checkpoint(
    name: str, damage: Callable[[Path], None], *says: str, auto: tuple[str, ...] = ()
) -> Case:
    """A damaged newest checkpoint (step 2): named with train.resume=PATH, one error line naming the file;
    with train.resume=auto (unless ``auto`` is empty), one warning line naming it, then a resume from
    step 1."""
    outcomes = {"train resume=PATH": error("cannot resume", *says)}
    if auto:
        outcomes["train resume=auto"] = counted(
            "warning: train.resume=auto: skipping checkpoint", *auto, "step_000001 at step 1"
        )
    return Case(name, "checkpoint", damaged("checkpoint", damage), outcomes)


def damaged_export(
    name: str, source: str, damage: Callable[[Path], None], *says: str, manifest: bool = True
) -> Case:
    """A damaged export: models.load_pretrained (here through eval_mm chat) says which file, in one line."""
    return Case(name, "export", damaged(source, damage, manifest), {"load_pretrained": error(*says)})


# ------------------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    status: int  # the exit status
    says: tuple[str, ...]  # substrings of the `error:` line (status 2), else of the whole output


def error(*says: str) -> Outcome:
    """One ``error:`` line (the last line of stderr) holding ``says``; exit status 2."""
    return Outcome(2, says)


def counted(*says: str) -> Outcome:
    """The command finishes (exit 0) and its output counts the skip or warning: ``says``."""
    return Outcome(0, says)


def check_fails(*says: str) -> Outcome:
    """data.check's report lists the problem (``says``) and fails: exit status 1."""
    return Outcome(1, says)


@dataclass(frozen=True)
class Case:
    name: str
    # "image": a bad image file; "data": a training data file; "benchmark": a synth_vqa test file;
    # "export": an export folder; "checkpoint": a training checkpoint folder (in its run)
    kind: str
    build: Callable[[Path], Path]  # writes the input into an empty folder, returns its path
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # surface -> what it must do


BOMB = "is over the cap of 64,000,000 pixels"


def bad_image(name: str, build: Callable[[Path], Path], says: str, chat_says: str | None = None) -> Case:
    """An image no surface may choke on: skipped and counted in training and data.check (within
    data.max_bad_images=5), one error line in eval (a benchmark sample is never skipped) and chat (which
    reads the header when it is given the image: ``chat_says`` when that is what fails)."""
    return Case(
        name,
        "image",
        build,
        {
            "data.check": counted("undecodable_image", "data.json record 4", says),
            "train": counted("'dropped_bad_image': 1", "'bad_image_files': 1", says),
            "eval run": error("synth_vqa sample 0", says),
            "chat": error(chat_says or says),
        },
    )


def bad_record(name: str, build: Callable[[Path], Path], *says: str) -> Case:
    """A record training refuses: one error line naming file, record and field; data.check lists it."""
    return Case(
        name, "data", build, {"data.check": check_fails("invalid_record", *says), "train": error(*says)}
    )


def bad_file(name: str, build: Callable[[Path], Path], *says: str) -> Case:
    """A data file that cannot be read at all: one error line on every surface."""
    return Case(name, "data", build, {"data.check": error(*says), "train": error(*says)})


CASES: list[Case] = [
    # ---- images (issue 27, "a decompression bomb kills training")
    bad_image(
        "png bomb: a 83-byte header claiming 30000x30000",
        writes("bomb.png", png_claiming(30000, 30000)),
        BOMB,
    ),
    bad_image(
        "png of 10000x10000 (over Pillow's warning limit)",
        writes("big.png", png_claiming(10000, 10000)),
        BOMB,
    ),
    bad_image(
        "png of 9000x8000 (over our cap, under Pillow's limits)",
        writes("over.png", png_claiming(9000, 8000)),
        "9000x8000 = 72,000,000 pixels, over the cap of 64,000,000",
    ),
    bad_image("jpeg cut in half", writes("cut.jpg", truncated_jpeg), "cannot decode image"),
    bad_image(
        "text file named .png",
        writes("text.png", "hello, not an image"),
        "cannot decode image",
        chat_says="cannot read image",
    ),
    bad_image("empty file named .jpg", writes("empty.jpg", b""), "cannot decode image", "cannot read image"),
    # ---- record shapes (issue 27, "wrong-typed records print tracebacks")
    bad_record(
        "llava turn value is a number",
        records(llava(("human", "<image>\nWhat?"), ("gpt", 5))),
        "data.json record 4",
        "turn 1: 'value' must be a string, got a number",
    ),
    bad_record(
        "a string in place of a turn",
        records({"conversations": ["hello", {"from": "assistant", "value": "hi"}]}),
        "data.json record 4",
        "turn 0 must be an object with 'from' and 'value', got a string",
    ),
    bad_record(
        "an object in place of the turn list",
        records({"conversations": {"from": "user", "value": "hi"}}),
        "data.json record 4",
        "'conversations' must be a list of turns, got an object",
    ),
    bad_record(
        "llava turn without 'value'",
        records(
            {
                "image": GOOD_IMAGE,
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt"}],
            }
        ),
        "data.json record 4",
        "turn 1 has no 'value'",
    ),
    bad_record(
        "qwen turn without 'value'",
        records({"conversations": [{"from": "user"}]}, suffix=".jsonl"),
        "data.jsonl line 5",
        "turn 0 has no 'value'",
    ),
    bad_record(
        "llava 'image' is a number",
        records(llava(("human", "<image>\nWhat?"), ("gpt", "red"), image=7)),
        "data.json record 4",
        "'image' must be a path or a list of paths, got a number",
    ),
    bad_record(
        "a record that is a list", records([1, 2]), "data.json record 4", "must be a JSON object, got list"
    ),
    bad_record(
        "task field of a wrong type",
        records({"task": "vqa", "image": GOOD_IMAGE, "question": ["what?"], "answer": "red"}),
        "data.json record 4",
        "field 'question' must be a string, got list",
    ),
    bad_record(
        "preference answer is a number",
        records({"conversations": [{"from": "user", "value": "which?"}], "chosen": 1, "rejected": "b"}),
        "data.json record 4",
        "'chosen' must be a non-empty answer text, got a number",
    ),
    bad_record(
        "an OpenAI-style 'messages' record",
        records({"messages": [{"role": "user", "content": "hi"}]}),
        "data.json record 4",
        "'messages' record",
        "'conversations'",
    ),
    bad_record(
        "jsonl line nested 200,000 deep",
        writes("deep.jsonl", lambda: json.dumps(chat("hi")) + "\n" + "[" * 200_000 + "\n"),
        "deep.jsonl line 2",
        "nested too deeply",
    ),
    bad_file(
        "json file nested 200,000 deep", writes("deep.json", "[" * 200_000), "deep.json", "nested too deeply"
    ),
    Case(
        "empty assistant answer",
        "data",
        records(chat(f"<img>{GOOD_IMAGE}</img>What colour?", answer=" ")),
        {
            "data.check": counted(
                "warning empty_answer", "data.json record 4: turn 1: the assistant answer is empty"
            ),
            "train": counted("'dropped_empty_answer': 1"),
        },
    ),
    # ---- benchmark files read by eval
    Case(
        "benchmark line nested 200,000 deep",
        "benchmark",
        writes("vqa_test.jsonl", "[" * 200_000 + "\n"),
        {"eval run": error("vqa_test.jsonl line 1", "nested too deeply")},
    ),
    # ---- exports (issue 27, "checkpoints are atomic but not verified"): models.load_pretrained
    damaged_export(
        "export: weights cut in half",
        "export",
        truncate("model.safetensors"),
        "model.safetensors: ",
        "bytes, but",
        "when written (truncated",
    ),
    damaged_export(
        "export: one flipped byte in the weights",
        "export",
        flip_byte("model.safetensors"),
        "model.safetensors: corrupt: its sha256 differs",
    ),
    damaged_export(
        "export without manifest: weights cut in half",
        "export",
        truncate("model.safetensors"),
        "model.safetensors: cannot read the weights (corrupt or incomplete?)",
        manifest=False,
    ),
    damaged_export(
        "export without manifest: config.json cut",
        "export",
        replace_text("config.json", '{"model_type": "vlrecipe_vlm", '),
        "config.json: not a valid VLM config",
        manifest=False,
    ),
    damaged_export(
        "export: tokenizer.json missing",
        "export",
        delete("tokenizer.json"),
        "tokenizer.json: missing, though",
    ),
    damaged_export(
        "export: manifest.json not JSON",
        "export",
        replace_text(MANIFEST, "{"),
        "manifest.json: not a readable manifest",
    ),
    damaged_export(
        "adapter: one flipped byte in the weights",
        "adapter",
        flip_byte("adapter_model.safetensors"),
        "adapter_model.safetensors: corrupt",
    ),
    damaged_export(
        "adapter without manifest: weights cut in half",
        "adapter",
        truncate("adapter_model.safetensors"),
        "adapter_model.safetensors: cannot read the adapter weights (corrupt or incomplete?)",
        manifest=False,
    ),
    damaged_export(
        "adapter without manifest: adapter_config.json not JSON",
        "adapter",
        replace_text("adapter_config.json", "{"),
        "adapter_config.json: malformed JSON",
        manifest=False,
    ),
    damaged_export(
        "adapter without manifest: tokenizer.json not JSON",
        "adapter",
        replace_text("tokenizer.json", "{"),
        "adapter: cannot read its tokenizer files",
        manifest=False,
    ),
    # ---- training checkpoints: python -m train resuming from one
    damaged_checkpoint(
        "checkpoint: one flipped byte in model.safetensors",
        flip_byte("model.safetensors"),
        "step_000002/model.safetensors: corrupt",
        auto=("step_000002/model.safetensors: corrupt",),
    ),
    damaged_checkpoint(
        "checkpoint: optimizer.pt cut in half",
        truncate("optimizer.pt"),
        "optimizer.pt: ",
        "(truncated or incomplete",
        auto=("optimizer.pt: ",),
    ),
    damaged_checkpoint(
        "checkpoint: no manifest (its write did not finish)",
        delete(MANIFEST),
        "manifest.json: missing",
        auto=("step_000002/manifest.json: missing",),
    ),
    damaged_checkpoint(
        "checkpoint: a file in deepspeed/ that the trainer did not write",
        add("deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        "zero_pp_rank_0_mp_rank_00_optim_states.pt: not in",
        "it is not read",
        auto=("optim_states.pt: not in",),
    ),
    damaged_checkpoint(
        "checkpoint: a rank's state missing", delete("rank_00000.pt"), "rank_00000.pt: missing, though"
    ),
]


# ------------------------------------------------------------------------------------------ surfaces


@dataclass(frozen=True)
class World:
    t: Path
    tokenizer: str
    checkpoint: str


def data_file_for(case: Case, path: Path) -> Path:
    """The training data file a case reaches data.check and train through."""
    if case.kind == "data":
        return path
    record = chat(f"<img>{path}</img>What colour?")
    return records(record)(path.parent)


def eval_root_for(w: World, case: Case, path: Path) -> Path:
    """A data root holding the synth_vqa benchmark whose image (or test file) is the case's input."""
    root = path.parent / "root"
    question = {
        "image": str(path if case.kind == "image" else good_image(path.parent)),
        "question": "What colour?",
        "question_id": 0,
    }
    write_vqa_root(root, [question])
    if case.kind == "benchmark":
        (root / "synthetic" / "vqa_test.jsonl").write_bytes(path.read_bytes())
    return root


# surface -> (the module run as `python -m`, argv of one case). load_pretrained: `eval_mm chat` loading a
# damaged export; train resume=PATH / =auto: `python -m train` resuming the damaged checkpoint's run.
# fmt: off
SURFACES: dict[str, tuple[str, Callable[[World, Case, Path], list[str]]]] = {
    "data.check": ("data.check", lambda w, case, path: [
        "--data", str(data_file_for(case, path)), "--tokenizer", w.tokenizer, "--image-tokens", "4", "--full",
        "--no-progress", "--out", str(path.parent / "check"), "data.max_bad_images=5"]),
    "train": ("train", lambda w, case, path: [
        str(REPO / "recipes" / "tiny" / "pretrain.yaml"), f"model.tokenizer_path={w.tokenizer}",
        f"data.paths=[{data_file_for(case, path)}]", f"checkpoint.out_dir={path.parent / 'run'}",
        "train.steps=1", "data.check=off", "data.max_bad_images=5"]),
    "eval run": ("eval_mm", lambda w, case, path: [
        "run", "--checkpoint", w.checkpoint, "--bench", "synth_vqa", "--data-root",
        str(eval_root_for(w, case, path)), "--out", str(path.parent / "eval"), "--num-workers", "0"]),
    "chat": ("eval_mm", lambda w, case, path: [
        "chat", "--checkpoint", w.checkpoint, "--image", str(path), "--prompt", "What colour?",
        "--max-new-tokens", "2"]),
    "load_pretrained": ("eval_mm", lambda w, case, path: [
        "chat", "--checkpoint", str(path), "--prompt", "What colour?", "--max-new-tokens", "2"]),
    "train resume=PATH": ("train", lambda w, case, path: [
        *resume_args(path.parents[2]), f"train.resume={path}"]),
    "train resume=auto": ("train", lambda w, case, path: [
        *resume_args(path.parents[2]), "train.resume=auto"]),
}
# fmt: on


def run_cases(module: str, argvs: list[list[str]]) -> list[dict]:
    """Run ``python -m module`` once per argv, all in this process (see the module docstring): each run's
    stdout and stderr are captured at the file-descriptor level, so log handlers and C code are too.
    An exception that escapes the command is printed as the traceback ``python -m`` would print."""
    results = []
    for argv in argvs:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = [module, *argv]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - exactly what the interpreter would print
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            out.seek(0)
            err.seek(0)
            results.append(
                {
                    "status": status,
                    "stdout": out.read().decode(errors="replace"),
                    "stderr": err.read().decode(errors="replace"),
                }
            )
    return results


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    t = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(t / "tokenizer")
    torch.manual_seed(0)
    build_vlm(presets.tiny(vocab_size=len(tokenizer)), tokenizer=tokenizer).save_pretrained(t / "ckpt")
    return World(t, str(t / "tokenizer"), str(t / "ckpt"))


@pytest.fixture(scope="module")
def results(world) -> Callable[[str], dict[str, dict]]:
    """surface -> {case name: its run}: one process per surface, started the first time it is asked for."""
    done: dict[str, dict[str, dict]] = {}

    def of(surface: str) -> dict[str, dict]:
        if surface not in done:
            module, argv_of = SURFACES[surface]
            cases = [c for c in CASES if surface in c.outcomes]
            argvs = []
            for i, case in enumerate(cases):
                folder = world.t / surface.replace(" ", "_") / str(i)
                folder.mkdir(parents=True)
                argvs.append(argv_of(world, case, case.build(folder)))
            env = {k: v for k, v in os.environ.items() if k != "VLRECIPE_DEBUG"}
            env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
            proc = subprocess.run(
                [sys.executable, __file__, module],
                input=json.dumps(argvs),
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[surface] = dict(zip([c.name for c in cases], json.loads(proc.stdout), strict=True))
        return done[surface]

    return of


@pytest.mark.parametrize("name, surface", [(c.name, s) for c in CASES for s in c.outcomes])
def test_a_bad_input_is_a_named_line_or_a_counted_skip_never_a_traceback(results, name, surface):
    case = next(c for c in CASES if c.name == name)
    expected = case.outcomes[surface]
    run = results(surface)[name]
    output = run["stdout"] + run["stderr"]
    assert "Traceback" not in output, output[-3000:]
    assert run["status"] == expected.status, f"{name} on {surface}: status {run['status']}\n{output[-3000:]}"
    if expected.status == 2:
        lines = run["stderr"].strip().splitlines()
        assert lines and lines[-1].startswith("error: "), output[-3000:]
        said = lines[-1]
    else:
        said = output
    for part in expected.says:
        assert part in said, f"{part!r} not in the output of {name} on {surface}:\n{said[-3000:]}"


def test_the_bomb_is_tiny_and_its_header_is_valid(tmp_path):
    """The corpus's bomb is the issue's: a PNG of under 200 bytes that Pillow opens as 30000x30000."""
    data = png_claiming(30000, 30000)
    assert len(data) < 200
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS  # only to read the header here
    try:
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (30000, 30000) and img.format == "PNG"
    finally:
        Image.MAX_IMAGE_PIXELS = saved


if __name__ == "__main__":  # the runner: `python tests/test_bad_inputs.py MODULE` < JSON list of argvs
    print(json.dumps(run_cases(sys.argv[1], json.loads(sys.stdin.read()))))
