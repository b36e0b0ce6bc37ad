"""models.load_pretrained: every export the trainer writes loads, with the logits of the model that was
exported (full, merged/, adapter/, a run's final/, the run directory); an adapter finds its base in
training_info.json or takes --base; user mistakes are UserErrors that name the path. Training continues
from an adapter export, and a LoRA run evaluates its adapter without merge_on_export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import load_pretrained
from models.errors import UserError
from models.loading import resolve_export
from train.checkpoint import export_final
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.recipe import FreezeSection, LoraSection, load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
TRAINED_IMAGE_SIZE = 56  # the adapter is trained at another size than its base's 84 (model.image_size)


def _inputs(model):
    cfg = model.config
    ids = torch.tensor(
        [
            [cfg.image_start_id]
            + [cfg.image_pad_id] * cfg.num_image_tokens
            + [cfg.image_end_id]
            + [30, 40, 41, 42, 43, 44]
        ]
    )
    pixels = torch.randn(
        1, 3, TRAINED_IMAGE_SIZE, TRAINED_IMAGE_SIZE, generator=torch.Generator().manual_seed(1)
    )
    return ids, pixels


def _logits(model, inputs):
    with torch.no_grad():
        return model(inputs[0], pixel_values=inputs[1]).logits


def _export(model, out: Path, init_from: Path | None, merge: bool) -> Path:
    """train.checkpoint.export_final as the trainer calls it, on a single process."""
    engine = SimpleNamespace(mode="single", model=model, dist=SimpleNamespace(is_main=True))
    info = {
        "stage": "sft",
        "prompt_format": "chatml",
        "steps": 1,
        "init_from": str(init_from) if init_from else None,
    }
    return export_final(engine, out, info, merge_lora=merge)


@pytest.fixture(scope="module")
def base_dir(tiny_vlm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_vlm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora(base_dir, tmp_path_factory):
    """A LoRA model as training leaves it (adapters, resampler and embeddings trained, image size changed),
    its logits, and the run directory export_final wrote (final/adapter + final/merged)."""
    model, _ = load_pretrained(base_dir)
    model.config.vision.image_size = TRAINED_IMAGE_SIZE
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="train")
    apply_freezing(model, freeze)
    model = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8, dropout=0.0), freeze)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: move every trained tensor so a lost one shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    inputs = _inputs(model.get_base_model())
    want = _logits(model, inputs)
    adapter_only = tmp_path_factory.mktemp("lora_adapter_only")
    _export(model, adapter_only / "final", base_dir, merge=False)
    run = tmp_path_factory.mktemp("lora_run")
    _export(model, run / "final", base_dir, merge=True)  # last: merging unloads the adapters from `model`
    return SimpleNamespace(inputs=inputs, want=want, run=run, adapter_only=adapter_only)


def test_a_full_export_loads_with_the_saved_models_logits_and_tokenizer(tiny_vlm, tiny_tokenizer, base_dir):
    model, tokenizer = load_pretrained(base_dir)
    assert type(model).__name__ == "VLM" and not model.training
    inputs = _inputs(tiny_vlm)
    torch.testing.assert_close(_logits(model, inputs), _logits(tiny_vlm, inputs), rtol=0, atol=0)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab() and model.tokenizer is tokenizer
    assert resolve_export(base_dir).kind == "full"


@pytest.mark.parametrize(
    "where, merge, kind",
    [
        ("final", True, "VLM"),  # a run's final/ with merged/ beside adapter/: merged/
        ("final", False, "PeftModel"),  # ... and the adapter when not merging
        ("final/merged", True, "VLM"),
        ("final/adapter", True, "VLM"),  # the adapter on its base (training_info.json init_from), merged
        ("final/adapter", False, "PeftModel"),
        (".", True, "VLM"),  # the run directory
    ],
)
def test_every_lora_export_layout_gives_the_trained_models_logits(lora, where, merge, kind):
    model, tokenizer = load_pretrained(lora.run / where, merge=merge)
    assert type(model).__name__ == kind
    torch.testing.assert_close(_logits(model, lora.inputs), lora.want, rtol=1e-4, atol=1e-4)
    vlm = model.get_base_model() if kind == "PeftModel" else model
    assert vlm.config.vision.image_size == TRAINED_IMAGE_SIZE  # from the adapter's vlm_config.json
    assert vlm.tokenizer is tokenizer is not None


def test_an_adapter_only_export_loads_and_is_not_its_base(lora, base_dir):
    assert sorted(p.name for p in (lora.adapter_only / "final").iterdir() if p.is_dir()) == ["adapter"]
    model, _ = load_pretrained(lora.adapter_only / "final")
    torch.testing.assert_close(_logits(model, lora.inputs), lora.want, rtol=1e-4, atol=1e-4)
    base, _ = load_pretrained(base_dir)
    assert not torch.allclose(_logits(base, lora.inputs), lora.want, atol=1e-3)


def test_an_adapter_without_a_recorded_base_needs_base(lora, base_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora.adapter_only / "final" / "adapter", adapter)
    (adapter / "manifest.json").unlink()  # training_info.json is edited below
    info = json.loads((adapter / "training_info.json").read_text())
    (adapter / "training_info.json").write_text(json.dumps({**info, "init_from": None}))
    with pytest.raises(
        UserError, match=rf"{adapter}: an adapter, and its training_info.json records no base.*--base"
    ):
        load_pretrained(adapter)
    model, _ = load_pretrained(adapter, base=base_dir)
    torch.testing.assert_close(_logits(model, lora.inputs), lora.want, rtol=1e-4, atol=1e-4)

    (adapter / "training_info.json").write_text(json.dumps({**info, "init_from": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=rf"base checkpoint {tmp_path / 'gone'} not found .*init_from"):
        load_pretrained(adapter)


def test_an_adapter_on_the_wrong_base_is_refused(lora, tiny_tokenizer, tmp_path):
    from models import build_vlm, presets

    other = build_vlm(presets.tiny(vocab_size=len(tiny_tokenizer) + 64), tokenizer=tiny_tokenizer)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="trained on another base .*vocabulary size"):
        load_pretrained(lora.run / "final" / "adapter", base=tmp_path / "other")


def test_paths_that_are_not_exports_are_user_errors_naming_them(tmp_path, base_dir):
    with pytest.raises(UserError, match=f"checkpoint not found: {tmp_path / 'missing'}"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(UserError, match="is a directory|a checkpoint is a directory"):
        load_pretrained(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'}: not a checkpoint directory"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "step_000010").mkdir()
    (tmp_path / "step_000010" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="a training checkpoint .*final/"):
        load_pretrained(tmp_path / "step_000010")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(UserError, match="not a vlrecipe VLM config"):
        load_pretrained(tmp_path / "hf")


def test_an_export_without_tokenizer_needs_one(base_dir, tiny_tokenizer, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(base_dir, bare)
    (bare / "manifest.json").unlink()  # an export written by other code, without a manifest
    for file in bare.iterdir():
        if file.name.startswith(
            ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")
        ):
            file.unlink()
    with pytest.raises(UserError, match=f"{bare}: the export has no tokenizer"):
        load_pretrained(bare)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    _, tokenizer = load_pretrained(bare, tokenizer=tmp_path / "tok")
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()


def test_dtype_and_device(base_dir):
    model, _ = load_pretrained(base_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_pretrained(base_dir)  # auto on CPU: float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        load_pretrained(base_dir, dtype="float8")


# ------------------------------------------------------------------------------ training uses it
def test_training_continues_from_an_adapter_export(lora, tmp_path):
    """model.init_from = a LoRA run's final/ holding only adapter/: the adapter is merged into its base and a
    full SFT stage starts from those weights."""
    from tests.test_train_world import make_world, world_overrides
    from train.assemble import build_model
    from train.loop import train

    world = make_world(tmp_path / "world")
    overrides = [
        f"model.init_from={lora.adapter_only / 'final'}",
        "train.steps=2",
        "train.micro_batch=2",
        "model.image_size=56",
        "data.image_size=56",
        *world_overrides(world, tmp_path / "run", "chat.json"),
    ]
    recipe = load_recipe(TINY / "sft.yaml", overrides)
    model, _ = build_model(recipe)
    assert type(model).__name__ == "VLM"
    torch.testing.assert_close(_logits(model.eval(), lora.inputs), lora.want, rtol=1e-4, atol=1e-4)

    export = train(recipe)
    info = json.loads((export / "training_info.json").read_text())
    assert info["init_from"] == str((lora.adapter_only / "final").resolve())
    load_pretrained(export)


@pytest.mark.slow
def test_a_lora_run_evaluates_its_adapter_without_merging(base_dir, tmp_path):
    """The recipe's eval section scores the adapter (put on init_from) when merge_on_export is false."""
    from data.synthetic import generate
    from tests.test_train_world import make_world, world_overrides
    from train.loop import train

    world = make_world(tmp_path / "world")
    generate(tmp_path / "eval" / "synthetic", seed=0, n_train=4, n_eval=3, image_size=56, vocab_size=300)
    recipe = load_recipe(
        TINY / "sft_lora.yaml",
        [
            f"model.init_from={base_dir}",
            "lora.merge_on_export=false",
            "train.steps=2",
            "train.micro_batch=2",
            "eval.benches=[synth_vqa]",
            f"eval.data_root={tmp_path / 'eval'}",
            "eval.limit=2",
            *world_overrides(world, tmp_path / "run", "chat.json"),
        ],
    )
    export = train(recipe)
    assert export == tmp_path / "run" / "final" / "adapter"
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["synth_vqa"]["num_samples"] == 2
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "vlm_config.json",
        "tokenizer_config.json",
    ):
        assert (export / name).is_file(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Q-LoRA trains 4-bit weights)")
def test_a_qlora_adapter_evaluates_and_chats_on_gpu_and_cpu(base_dir, tmp_path):
    """recipes/sft_qlora.yaml's layout (merge_on_export: false) on the tiny model: the adapter loads on its
    bf16 base on the GPU and on an fp32 base on the CPU, and both answer."""
    from eval_mm.chat import Chat, GenerationSettings
    from tests.test_train_world import make_world, world_overrides
    from train.loop import train

    world = make_world(tmp_path / "world")
    recipe = load_recipe(
        TINY / "sft_lora.yaml",
        [
            f"model.init_from={base_dir}",
            "quantization.enabled=true",
            "lora.merge_on_export=false",
            "train.bf16=true",
            "train.steps=2",
            "train.micro_batch=2",
            "parallel.mode=ddp",
            *world_overrides(world, tmp_path / "run", "chat.json"),
        ],
    )
    export = train(recipe)
    assert export.name == "adapter"
    answers = []
    for device in ("cuda", "cpu"):
        model, tokenizer = load_pretrained(tmp_path / "run" / "final", device=device)
        chat = Chat(model, tokenizer, settings=GenerationSettings(max_new_tokens=8))
        answers.append(chat.ask("What color is the picture?", images=[world / "images" / "0.png"]).text)
    assert all(isinstance(a, str) for a in answers)
