"""One loader for every export the trainer writes: ``load_pretrained(path) -> (model, tokenizer)``.

What a path may be (train/checkpoint.py ``export_final`` writes them):

* a **full export** (``VLM.save_pretrained``): ``config.json`` + safetensors + tokenizer files; also a
  LoRA run's ``final/merged/``;
* an **adapter** (a LoRA / Q-LoRA run's ``final/adapter/``): peft's ``adapter_config.json`` +
  ``adapter_model.safetensors`` (LoRA weights, and the resampler / embeddings it trained in full),
  ``training_info.json`` (whose ``init_from`` names the base it was trained on), and, since issue 12,
  the tokenizer and the trained model's ``vlm_config.json``;
* a run's **final/** holding ``adapter/`` and maybe ``merged/``; or the **run directory** itself;
* a **Hugging Face family export** (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``config.json`` whose ``model_type`` is
  one of ``models.families.specs.FAMILIES``, e.g. ``HFFamilyModel.save_pretrained`` plus the processor's
  files, or a released directory), full or merged, or a peft adapter on one. It loads as an
  ``HFFamilyModel`` and the second value returned is the family's **processor** (tokenizer, chat template
  and image processor), which is what eval_mm encodes its prompts with (``is_family_model``).

An adapter is put on its base (``base=`` or ``training_info.json``'s ``init_from``), which is loaded by
this same function, so an adapter trained on another adapter's export loads too. ``merge=True`` folds
it into plain weights (``peft``'s ``merge_and_unload``): the result is a ``VLM`` like any full export.
``merge=False`` keeps the ``peft`` model (its ``generate`` and forward behave as the VLM's).

A Q-LoRA adapter was trained on a 4-bit copy of its base; here it is put on the base in the
requested dtype (bf16 / fp32), i.e. the de-quantised weights, which is what ``merge_and_unload`` of a
4-bit model computes as well.

User mistakes (not a checkpoint, a training checkpoint instead of an export, a missing base, an
adapter whose base does not fit) raise ``models.errors.UserError`` naming the path.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig

from models.build import load_tokenizer, load_vlm
from models.config import VLMConfig
from models.errors import UserError
from models.families.adapter import HFFamilyModel
from models.families.processor import load_family_processor
from models.families.specs import FAMILIES
from models.manifest import has_manifest, verify_manifest
from models.tokens import TOKENIZER_FILES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
TRAINING_INFO = "training_info.json"
VLM_CONFIG_OF_ADAPTER = "vlm_config.json"  # the trained model's VLMConfig, written beside an adapter
MAX_ADAPTER_CHAIN = 8  # adapter on an adapter export on ...: guards against an init_from cycle


def import_peft(module: str = "peft"):
    """``import peft`` (or one of its modules), without bitsandbytes' CPU start-up warning.

    peft imports bitsandbytes, which on a CPU with AVX512-bf16 asks the Hugging Face Hub for a 4-bit CPU
    kernel (through ``kernels``); that is remote code, which is not trusted, so the request is refused
    and bitsandbytes logs a warning that suggests ``trust_remote_code=True``. Nothing here runs 4-bit
    layers on a CPU (Q-LoRA needs CUDA), so that one logger is quietened to errors before the import.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return importlib.import_module(module)


@dataclass
class ExportLayout:
    """Where the weights of an export are. ``kind`` is "full" or "adapter"; ``path`` is the directory
    to load (the full export, or the adapter); ``origin`` the directory the user named."""

    kind: str
    path: Path
    origin: Path


def _is_full(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and '"vlrecipe_vlm"' in config.read_text(encoding="utf-8", errors="replace")


def _is_family(path: Path) -> bool:
    """A Hugging Face directory of a supported family (config.json's model_type is one of FAMILIES')."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return False
    return any(spec.model_type == model_type for spec in FAMILIES.values())


def _is_weights(path: Path) -> bool:
    return _is_full(path) or _is_family(path)


def is_family_model(model: torch.nn.Module) -> bool:
    """True for a model of a Hugging Face family (an ``HFFamilyModel``, or a peft model around one): its
    prompts are encoded by its processor (data.hf_encode), not by the Qwen-VL tokenizer."""
    return isinstance(base_vlm(model), HFFamilyModel)


def _is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def resolve_export(path: str | Path, merge: bool = True) -> ExportLayout:
    """Find the weights an export path stands for (see the module docstring for the accepted layouts).

    A run's ``final/`` with both ``merged/`` and ``adapter/`` gives ``merged/`` when ``merge`` (the
    same weights, without loading the base) and ``adapter/`` otherwise."""
    origin = Path(path)
    if not origin.exists():
        raise UserError(f"checkpoint not found: {origin}")
    if not origin.is_dir():
        raise UserError(f"{origin}: a checkpoint is a directory (an export written by training), not a file")
    if _is_weights(origin):
        return ExportLayout("full", origin, origin)
    if _is_adapter(origin):
        return ExportLayout("adapter", origin, origin)
    if (origin / "final").is_dir():  # a run directory: its export
        return resolve_export(origin / "final", merge)
    merged, adapter = origin / "merged", origin / "adapter"
    if _is_weights(merged) and (merge or not _is_adapter(adapter)):
        return ExportLayout("full", merged, origin)
    if _is_adapter(adapter):
        return ExportLayout("adapter", adapter, origin)
    if (origin / "trainer_state.json").is_file():
        raise UserError(
            f"{origin}: a training checkpoint (for train.resume), not an export; use the run's final/ "
            "directory, written when training ends"
        )
    if (origin / "config.json").is_file():
        families = ", ".join(spec.model_type for spec in FAMILIES.values())
        raise UserError(
            f"{origin}/config.json is not a vlrecipe VLM config, nor a supported family's "
            f"(model_type {families}); convert Qwen-VL-Chat with python -m models.convert_qwenvl; "
            "an LLM goes in model.llm_path"
        )
    raise UserError(
        f"{origin}: not a checkpoint directory (no config.json, {ADAPTER_CONFIG}, adapter/ or merged/)"
    )


def training_info(path: str | Path) -> dict:
    """The export's training_info.json (stage, prompt format, init_from, ...), {} when absent."""
    file = Path(path) / TRAINING_INFO
    return _read_json(file) if file.is_file() else {}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: malformed JSON ({e})") from e


def _read_tokenizer(path: Path):
    """``models.build.load_tokenizer``; an unreadable tokenizer file is a UserError naming the directory."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:  # a malformed tokenizer.json / tokenizer_config.json (JSONDecodeError)
        raise UserError(_naming(path, e, "cannot read its tokenizer files: ")) from e


def _naming(path: Path, error: BaseException, what: str = "") -> str:
    """The error's message, prefixed with ``path`` (and ``what``) unless it names the path already."""
    message = str(error)
    return message if str(path) in message else f"{path}: {what}{message}"


def export_config_and_tokenizer(path: str | Path, base: str | Path | None = None, depth: int = 0):
    """``(VLMConfig, tokenizer directory)`` of any export, read from its files without loading weights
    (the dataset check needs both before the model is built). An adapter's are its own
    ``vlm_config.json`` / tokenizer files where it has them, else its base's. A Hugging Face family's export
    gives its transformers config and the directory holding its processor."""
    layout = resolve_export(path)
    if layout.kind == "full" and _is_family(layout.path):
        return AutoConfig.from_pretrained(layout.path, trust_remote_code=False), layout.path
    if layout.kind == "full":
        return VLMConfig.load(layout.path / "config.json"), layout.path
    if depth >= MAX_ADAPTER_CHAIN:
        raise UserError(
            f"{layout.origin}: more than {MAX_ADAPTER_CHAIN} adapters on top of each other "
            "(does an init_from point back at its own run?)"
        )
    config, tokenizer_dir = export_config_and_tokenizer(_adapter_base(layout, base), depth=depth + 1)
    if (layout.path / VLM_CONFIG_OF_ADAPTER).is_file():
        config = VLMConfig.load(layout.path / VLM_CONFIG_OF_ADAPTER)
    if any((layout.path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = layout.path
    return config, tokenizer_dir


def pick_device(name: str | None = None) -> torch.device:
    """None / "auto": this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is there, else the CPU."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible (use --device cpu)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} (cpu, cuda or auto)") from e


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on CUDA, float32 elsewhere; a name such as "bfloat16"; or a dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise UserError(f"unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
        return resolved
    return dtype


def load_pretrained(
    path: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    merge: bool = True,
    tokenizer: str | Path | None = None,
    keep_fp32=None,
):
    """Load any export as ``(model, tokenizer)``, the model in eval mode on ``device`` (default CPU).

    - ``base``: the base an adapter goes on, overriding ``training_info.json``'s ``init_from``; itself
      any export this function loads. Ignored (with no error) for full exports.
    - ``dtype``: None / "auto" = bfloat16 on CUDA, float32 elsewhere.
    - ``merge``: fold an adapter into the weights (a plain ``VLM``); False keeps the peft model.
    - ``tokenizer``: a tokenizer directory to use instead of the export's own (for a family export: a
      directory holding the processor).
    - ``keep_fp32``: modules kept in float32 whatever ``dtype`` is (``models.build_vlm``; the trainer keeps
      the modules it trains in fp32). Qwen-VL models only.

    A family export returns ``(HFFamilyModel or its peft model, processor)``.
    """
    device = torch.device(device or "cpu")
    dtype = resolve_dtype(dtype, device)
    model, tok = _load(Path(path), base, dtype, device, merge, depth=0, keep_fp32=keep_fp32)
    family = is_family_model(model)
    if tokenizer is not None:
        tok = _load_text_side(Path(tokenizer), family)
    if tok is None:
        raise UserError(
            f"{path}: the export has no tokenizer (expected {' or '.join(TOKENIZER_FILES)}); pass a "
            "tokenizer directory (model.tokenizer_path in a recipe)"
        )
    if not family:  # a family model's processor travels beside it (the second value), never inside
        base_vlm(model).tokenizer = tok
    return model.eval(), tok


def _load_text_side(path: Path, family: bool):
    """The tokenizer (Qwen-VL) or the processor (a family) saved in ``path``; None when it holds none."""
    if not family:
        return _read_tokenizer(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return load_family_processor(path)
    except (OSError, ValueError) as e:  # tokenizer files without the image processor's
        raise UserError(f"{path}: cannot load the family's processor ({e})") from e


def base_vlm(model: torch.nn.Module) -> torch.nn.Module:
    """The VLM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _load(
    path: Path,
    base: str | Path | None,
    dtype: torch.dtype,
    device: torch.device,
    merge: bool,
    depth: int,
    keep_fp32=None,
):
    layout = resolve_export(path, merge)
    check_export_files(layout.path)
    if layout.kind == "full" and _is_family(layout.path):
        model = HFFamilyModel.from_pretrained(layout.path, dtype=dtype).to(device)
        return model, _load_text_side(layout.path, family=True)
    if layout.kind == "full":
        try:
            model = load_vlm(layout.path, dtype=dtype, device=device, keep_fp32=keep_fp32)
        except (FileNotFoundError, ValueError) as e:  # no weights / weights that do not fit the config
            raise UserError(_naming(layout.path, e)) from e
        return model, model.tokenizer
    return _load_adapter(layout, base, dtype, device, merge, depth, keep_fp32)


def check_export_files(path: Path) -> None:
    """An export with a manifest (every save path writes one last: models.manifest) must match it, so that a
    truncated or corrupt file is one error naming it before anything is read. Files added to an export later
    (eval's metrics.json) are not checked; an export without a manifest (older, or written by other code) is
    loaded as it is, and a weight file that does not parse is still one error (models.load_vlm)."""
    if has_manifest(path):
        verify_manifest(path, unlisted_ok=True)


def _adapter_base(layout: ExportLayout, base: str | Path | None) -> Path:
    if base is not None:
        where = "--base"
        found = Path(base)
    else:
        # training_info.json sits in the adapter directory and in the run's final/.
        info = training_info(layout.path) or training_info(layout.path.parent)
        init_from = info.get("init_from")
        if not init_from:
            raise UserError(
                f"{layout.path}: an adapter, and its training_info.json records no base (init_from); "
                "pass the base export it was trained on (--base DIR, or base=)"
            )
        where = f"{layout.path / TRAINING_INFO} init_from"
        found = Path(init_from)
    if not found.exists():
        raise UserError(
            f"base checkpoint {found} not found (from {where}) for the adapter {layout.path}; "
            "pass the base export it was trained on (--base DIR, or base=)"
        )
    return found


def _load_adapter(
    layout: ExportLayout,
    base: str | Path | None,
    dtype: torch.dtype,
    device: torch.device,
    merge: bool,
    depth: int,
    keep_fp32=None,
):
    if depth >= MAX_ADAPTER_CHAIN:
        raise UserError(
            f"{layout.origin}: more than {MAX_ADAPTER_CHAIN} adapters on top of each other "
            "(does an init_from point back at its own run?)"
        )
    base_path = _adapter_base(layout, base)
    # The base is merged whatever `merge` says: this adapter's LoRA weights sit on its plain weights.
    model, tok = _load(base_path, None, dtype, device, merge=True, depth=depth + 1, keep_fp32=keep_fp32)
    trained_config = layout.path / VLM_CONFIG_OF_ADAPTER
    if trained_config.is_file():
        _check_base_fits(VLMConfig.load(trained_config), model.config, layout.path, base_path)
        # The trainer may run the vision tower at another size than the base's (model.image_size).
        model.config.vision.image_size = VLMConfig.load(trained_config).vision.image_size
    if any((layout.path / f).is_file() for f in TOKENIZER_FILES):
        tok = _load_text_side(layout.path, is_family_model(model))
    _read_json(layout.path / ADAPTER_CONFIG)  # malformed: named here, not as a base that does not fit
    try:
        model = apply_adapter(model, layout.path, merge)
    except SafetensorError as e:  # peft reads the weights with safetensors
        raise UserError(
            f"{layout.path / ADAPTER_WEIGHTS}: cannot read the adapter weights (corrupt or incomplete?): {e}"
        ) from e
    except (KeyError, RuntimeError, ValueError) as e:  # shapes / names that do not fit the base
        raise UserError(f"{layout.path}: the adapter does not fit the base {base_path}: {e}") from e
    return model.to(device), tok


def apply_adapter(base, adapter_dir: str | Path, merge: bool = True):
    """A peft adapter directory on a base VLM (in memory); ``merge`` folds it into plain weights (a VLM)."""
    model = import_peft().PeftModel.from_pretrained(base, str(adapter_dir))
    return model.merge_and_unload() if merge else model


def _check_base_fits(trained, base, adapter: Path, base_path: Path) -> None:
    """The shapes the adapter was trained with must be the base's (a wrong --base fails here, clearly)."""
    checks = {
        "LLM hidden size": (trained.hidden_size, base.hidden_size),
        "LLM layers": (
            trained.text_config.get("num_hidden_layers"),
            base.text_config.get("num_hidden_layers"),
        ),
        "vocabulary size": (trained.text_config.get("vocab_size"), base.text_config.get("vocab_size")),
        "image tokens": (trained.num_image_tokens, base.num_image_tokens),
        "vision width": (trained.vision.width, base.vision.width),
    }
    wrong = [f"{name} {t} vs {b}" for name, (t, b) in checks.items() if t != b]
    if wrong:
        raise UserError(
            f"{adapter} was trained on another base than {base_path}: {', '.join(wrong)} "
            "(adapter vs base); pass the right one with --base"
        )
