"""Checkpoints you can trust (issue 27): every checkpoint and export ends with a manifest of its files' sizes
and sha256 (models.manifest); resume and models.load_pretrained check it. A truncated, corrupt, missing or
(in a training checkpoint) added file is one error naming it; ``train.resume=auto`` passes over a checkpoint
that fails, with one warning line, and takes the previous good one.

Damaged exports and checkpoints through the commands (models.load_pretrained via eval_mm, ``python -m train``
resuming) are rows of the bad-input corpus, tests/test_bad_inputs.py, built with the damage helpers below."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from models import load_pretrained
from models.errors import UserError
from models.manifest import MANIFEST, CorruptCheckpointError, verify_manifest, write_manifest
from train.checkpoint import export_final, resolve_resume
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.recipe import FreezeSection, LoraSection


# ------------------------------------------------------------------------------------- damage to a file
def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def flip_byte(name: str, offset: int = -100) -> Callable[[Path], None]:
    """One bit of one byte near the end: inside the tensor data, where safetensors notices nothing."""

    def damage(directory: Path) -> None:
        data = bytearray((directory / name).read_bytes())
        data[offset] ^= 0x01
        (directory / name).write_bytes(bytes(data))

    return damage


def replace_text(name: str, text: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        (directory / name).write_text(text)

    return damage


def delete(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def add(name: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"not written by the trainer")

    return damage


# ------------------------------------------------------------------------------------------ the manifest
def test_a_manifest_lists_every_file_with_its_size_and_sha256_and_is_written_atomically(tmp_path):
    (tmp_path / "deepspeed" / "state").mkdir(parents=True)
    (tmp_path / "deepspeed" / "state" / "shard.pt").write_bytes(b"abc")
    (tmp_path / "trainer_state.json").write_text("{}")
    write_manifest(tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert files["deepspeed/state/shard.pt"] == {
        "size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }  # of "abc"
    assert sorted(files) == ["deepspeed/state/shard.pt", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepspeed", MANIFEST, "trainer_state.json"]
    verify_manifest(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (truncate("weights.bin"), r"weights.bin: 512 bytes, but 1024 when written \(truncated"),
        (flip_byte("weights.bin"), r"weights.bin: corrupt: its sha256 differs"),
        (delete("weights.bin"), r"weights.bin: missing, though .*manifest.json lists it"),
        (
            add("deepspeed/state/extra.pt"),
            r"deepspeed/state/extra.pt: not in .*manifest.json.*it is not read",
        ),
        (delete(MANIFEST), r"manifest.json: missing \(the checkpoint was not completely written\)"),
        (replace_text(MANIFEST, '{"files": '), r"manifest.json: not a readable manifest"),
    ],
)
def test_every_damage_is_one_error_naming_the_file(tmp_path, damage, message):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    write_manifest(tmp_path)
    damage(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        verify_manifest(tmp_path)
    assert "\n" not in str(caught.value)


def test_an_export_may_gain_files_a_training_checkpoint_may_not(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")  # what eval writes into a run's final/
    verify_manifest(tmp_path, unlisted_ok=True)
    with pytest.raises(CorruptCheckpointError, match="metrics.json: not in"):
        verify_manifest(tmp_path)


# ----------------------------------------------------------------------------------- choosing a resume
def fake_checkpoint(run: Path, step: int, damage: Callable[[Path], None] | None = None) -> Path:
    path = run / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    write_manifest(path)
    if damage is not None:
        damage(path)
    return path


def test_resume_auto_skips_incomplete_and_corrupt_checkpoints_with_one_warning_each(tmp_path, capsys):
    good = fake_checkpoint(tmp_path, 2)
    corrupt = fake_checkpoint(tmp_path, 4, flip_byte("model.safetensors"))
    incomplete = fake_checkpoint(tmp_path, 6, delete(MANIFEST))
    assert resolve_resume("auto", tmp_path) == good
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert all(w.startswith("warning: train.resume=auto: skipping checkpoint") for w in warnings)
    assert f"{incomplete}: " in warnings[0] and "manifest.json: missing" in warnings[0]
    assert f"{corrupt}: " in warnings[1] and "model.safetensors: corrupt" in warnings[1]


def test_resume_auto_takes_the_newest_good_checkpoint_silently_and_starts_fresh_without_any(tmp_path, capsys):
    assert resolve_resume("auto", tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    assert resolve_resume("auto", tmp_path) == newest and capsys.readouterr().err == ""


def test_resume_auto_with_no_good_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    fake_checkpoint(tmp_path, 2, truncate("model.safetensors"))
    with pytest.raises(UserError, match=r"none of the 1 checkpoints in .*checkpoints is complete and intact"):
        resolve_resume("auto", tmp_path)


def test_deepspeed_files_are_read_only_from_a_checkpoint_whose_manifest_matches(tmp_path):
    """DeepSpeed unpickles what it finds (torch.load(weights_only=False)): a file in its folder that the
    trainer did not write makes the checkpoint unusable, named, before DeepSpeed is called."""
    path = fake_checkpoint(tmp_path, 2, add("deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    with pytest.raises(
        UserError,
        match=r"train.resume=.*cannot resume: "
        r".*zero_pp_rank_1_mp_rank_00_optim_states.pt: not in",
    ):
        resolve_resume(str(path), tmp_path)


# ----------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exports(tiny_vlm, tmp_path_factory) -> SimpleNamespace:
    """A full export (VLM.save_pretrained) and a LoRA run's final/adapter (train.checkpoint.export_final)."""
    root = tmp_path_factory.mktemp("exports")
    tiny_vlm.save_pretrained(root / "full")
    model, _ = load_pretrained(root / "full")
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="train")
    apply_freezing(model, freeze)
    model = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8, dropout=0.0), freeze)
    engine = SimpleNamespace(mode="single", model=model, dist=SimpleNamespace(is_main=True))
    info = {"stage": "sft", "prompt_format": "chatml", "steps": 1, "init_from": str(root / "full")}
    export_final(engine, root / "lora" / "final", info)
    return SimpleNamespace(full=root / "full", adapter=root / "lora" / "final" / "adapter")


def test_every_export_the_trainer_writes_carries_a_manifest_that_load_pretrained_accepts(exports):
    for directory in (exports.full, exports.adapter):
        verify_manifest(directory)
    assert "training_info.json" in json.loads((exports.adapter / MANIFEST).read_text())["files"]
    load_pretrained(exports.adapter)
