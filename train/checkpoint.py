"""Training checkpoints (atomic, keep-last-N, exact resume) and the final export.

Layout of a run directory (``checkpoint.out_dir``)::

    resolved.yaml                 the recipe as run
    checkpoints/step_000200/      one checkpoint (written as step_000200.tmp, renamed when complete)
        manifest.json             size and sha256 of every file below, written last (models.manifest)
        trainer_state.json        step, counters (rank 0)
        rank_00000.pt             per-rank RNG states and data-loader position
        model.safetensors         trainable parameters      } single process / DDP
        optimizer.pt, scheduler.pt                          }
        deepspeed/                DeepSpeed's own sharded files (ZeRO-2/3; every rank writes)
    final/                        HF-style export (VLM.save_pretrained) or, with LoRA, adapter/ (+ merged/)

Only trainable parameters go into a checkpoint: frozen ones are rebuilt from the recipe's
``model.init_from`` on resume, which keeps stage-1 and LoRA checkpoints small.

Resume reads only a checkpoint whose files match its manifest: ``train.resume=auto`` passes over one that
does not (incomplete, truncated, corrupt), with one warning line naming it, and takes the newest that does;
a checkpoint named by path must match. Exports (``final/``) get a manifest too, which
``models.load_pretrained`` checks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eval_mm.sharding import broadcast_from_rank0
from models.errors import MissingFileError, UserError
from models.loading import VLM_CONFIG_OF_ADAPTER, is_family_model
from models.manifest import CorruptCheckpointError, verify_manifest, write_manifest
from train.parallel import DistInfo, Engine, barrier

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------ locations
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``.tmp`` ones are unfinished and ignored), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(resume: str | None, run_dir: str | Path, is_main: bool = True) -> Path | None:
    """The checkpoint to resume from, its files checked against its manifest: ``None`` -> start fresh;
    ``"auto"`` -> the newest good checkpoint of the run (each newer one that fails the check is named in a
    warning line), or a fresh start when the run has none; else the path, which must pass the check.

    Under several processes rank 0 checks (``is_main``) and every rank gets its answer, or its error."""
    if resume is None:
        return None
    chosen, error = _choose_checkpoint(resume, Path(run_dir)) if is_main else (None, None)
    chosen, error = broadcast_from_rank0((chosen, error))
    if error is not None:
        raise UserError(error)
    return None if chosen is None else Path(chosen)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (one line naming the file), or None if it can."""
    try:
        verify_manifest(path)  # every file listed, none added: resume reads them all
    except CorruptCheckpointError as e:
        return str(e)
    return None


def _choose_checkpoint(resume: str, run_dir: Path) -> tuple[str | None, str | None]:
    """(the checkpoint to resume from or None, an error message or None); prints a warning per skipped one."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            return None, f"train.resume={resume}: no such checkpoint directory"
        problem = checkpoint_problem(path)
        return (None, f"train.resume={resume}: cannot resume: {problem}") if problem else (str(path), None)
    found = list_checkpoints(run_dir)
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), None
        print(
            f"warning: train.resume=auto: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True
        )
    if found:
        return None, (
            f"train.resume=auto: none of the {len(found)} checkpoints in {run_dir / CHECKPOINTS} "
            "is complete and intact (see the warnings above); to start over, move them away"
        )
    return None, None


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------- save
def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    engine: Engine, run_dir: str | Path, step: int, trainer_state: dict, loader_state: dict, keep_last: int
) -> Path:
    """Write checkpoint ``step`` atomically: every rank writes into ``step_N.tmp``; after a barrier,
    rank 0 renames it to ``step_N`` and prunes old checkpoints to ``keep_last``."""
    info = engine.dist
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier()
    if engine.uses_deepspeed:
        # DeepSpeed writes its own per-rank model/optimizer shards (and the scheduler state).
        engine.module.save_checkpoint(
            str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True
        )
    elif info.is_main:
        save_file(
            {k: v.contiguous().cpu() for k, v in trainable_state_dict(engine.model).items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        torch.save(engine.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(engine.scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"rng": rng_state(), "data": loader_state}, tmp / f"rank_{info.rank:05d}.pt")
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    barrier()
    if info.is_main:
        write_manifest(tmp)  # last: a checkpoint with a matching manifest is one whose every file was written
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


# --------------------------------------------------------------------------------------- load
def load_checkpoint(engine: Engine, path: Path) -> tuple[dict, dict]:
    """Restore model, optimiser, scheduler and this rank's RNG. Returns (trainer_state, loader_state).
    ``path`` comes from ``resolve_resume``, which checked its files against the manifest."""
    info: DistInfo = engine.dist
    rank_file = path / f"rank_{info.rank:05d}.pt"
    if not rank_file.is_file():
        raise MissingFileError(
            f"{rank_file}: missing; was the checkpoint written with a different world size?"
        )
    if engine.uses_deepspeed:
        # DeepSpeed reads its own files with torch.load(weights_only=False), which runs whatever code a
        # pickle names. They are read only from a checkpoint whose manifest resolve_resume verified (every
        # file listed and none added): the files this trainer wrote. That guards against corruption and
        # stray files, not against a forged manifest: resume DeepSpeed only from checkpoints you wrote.
        loaded, _ = engine.module.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_module_strict=False
        )
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load its checkpoint")
    else:
        saved = load_file(path / "model.safetensors", device=str(info.device))
        expected = trainable_state_dict(engine.model)
        if set(saved) != set(expected):
            raise UserError(
                f"{path}: trainable parameters differ from the recipe's: "
                f"missing {sorted(set(expected) - set(saved))[:5]}, "
                f"unexpected {sorted(set(saved) - set(expected))[:5]}"
            )
        with torch.no_grad():
            for name, param in engine.model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        engine.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=info.device, weights_only=True)
        )
        engine.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_state = torch.load(rank_file, weights_only=True)
    set_rng_state(rank_state["rng"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, rank_state["data"]


# ------------------------------------------------------------------------------------- export
def full_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered from the shards under ZeRO-3); None elsewhere.
    Must be called on every rank."""
    if engine.mode == "zero3":
        gathered = engine.module._zero3_consolidated_16bit_state_dict()
        if gathered is None:
            return None
        return {k.removeprefix("model."): v for k, v in gathered.items()}  # drop the LossOutputs wrapper
    return engine.model.state_dict() if engine.dist.is_main else None


def export_final(engine: Engine, out_dir: str | Path, training_info: dict, merge_lora: bool = False) -> Path:
    """Write the final model: an HF-style VLM directory (``VLM.save_pretrained``), or for LoRA the
    adapter (``adapter/``, with trained embeddings / resampler as modules_to_save, the model's config and
    the tokenizer) and, on request, a merged full export (``merged/``); models.load_pretrained loads any
    of them. ``training_info.json`` records the stage and the prompt format
    eval_mm should use ("chatml" after SFT). Returns the directory eval_mm should load."""
    out_dir = Path(out_dir)
    state_dict = full_state_dict(engine)  # collective under ZeRO-3: every rank
    target = out_dir
    if engine.dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        model = engine.model
        exports = [out_dir]
        if hasattr(model, "peft_config"):  # LoRA / Q-LoRA
            model.save_pretrained(out_dir / "adapter", state_dict=state_dict)
            exports = [out_dir / "adapter"]
            # What models.load_pretrained needs besides the base (training_info's init_from): the trained
            # model's config (its image size may differ from the base's) and the tokenizer it trained with.
            vlm = model.get_base_model()
            if is_family_model(
                vlm
            ):  # its processor (tokenizer, template, image processor); config: the base's
                vlm.processor.save_pretrained(out_dir / "adapter")
            else:
                vlm.config.save(out_dir / "adapter" / VLM_CONFIG_OF_ADAPTER)
                if vlm.tokenizer is not None:
                    vlm.tokenizer.save_pretrained(out_dir / "adapter")
            if merge_lora:
                merged = model.merge_and_unload()
                merged.save_pretrained(out_dir / "merged", manifest=False)  # written below, with the rest
                target = out_dir / "merged"
                exports.append(target)
            else:
                target = out_dir / "adapter"
        else:
            model.save_pretrained(out_dir, state_dict=state_dict, manifest=False)
        for where in {out_dir, target}:
            (where / "training_info.json").write_text(json.dumps(training_info, indent=2) + "\n")
            # eval_mm.prompts.checkpoint_prompt_format reads chat_format here (as Qwen-VL-Chat records it).
            gen_file = where / "generation_config.json"
            gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
            gen.update(chat_format=training_info["prompt_format"], stage=training_info["stage"])
            gen_file.write_text(json.dumps(gen, indent=2) + "\n")
        for export in exports:  # last, each directory models.load_pretrained loads (it checks them)
            write_manifest(export)
    barrier()
    return target
