"""Initialising the vision tower from OpenCLIP is exact: same weights, same per-block outputs."""

import json

import open_clip
import pytest
import torch
from torch import nn

from models.config import VisionConfig
from models.openclip import load_openclip_vision, openclip_to_tower_state_dict
from models.vision import VisionTower, resize_pos_table

OPENCLIP_CFG = {
    "embed_dim": 32,
    # 56 px / 14 = 4x4 patches + class token; head_width 16 -> 4 heads; exact GELU (no quick_gelu)
    "vision_cfg": {
        "image_size": 56,
        "layers": 2,
        "width": 64,
        "head_width": 16,
        "mlp_ratio": 2.0,
        "patch_size": 14,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def openclip_checkpoint(tmp_path_factory):
    """A tiny OpenCLIP architecture registered from a JSON file, and a random checkpoint of it."""
    root = tmp_path_factory.mktemp("openclip")
    (root / "configs").mkdir()
    (root / "configs" / "vlrecipe-test-tiny.json").write_text(json.dumps(OPENCLIP_CFG))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("vlrecipe-test-tiny", pretrained=None)
    with torch.no_grad():  # make LayerNorms and biases non-trivial so the mapping is really tested
        for name, p in model.visual.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = root / "tiny.pt"
    torch.save(model.state_dict(), path)
    return "vlrecipe-test-tiny", path, model


def tower_cfg(pos_grid: int, ln_eps: float) -> VisionConfig:
    return VisionConfig(
        image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_dim=128, pos_grid=pos_grid,
        ln_eps=ln_eps,
    )  # fmt: skip


def test_openclip_uses_exact_gelu(openclip_checkpoint):
    act = openclip_checkpoint[2].visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(act, nn.GELU) and act.approximate == "none"


def test_weights_are_copied_exactly(openclip_checkpoint):
    name, path, reference = openclip_checkpoint
    tower = VisionTower(tower_cfg(pos_grid=4, ln_eps=1e-6))
    load_openclip_vision(tower, name, path)
    v = reference.visual
    assert torch.equal(tower.patch_embed.weight, v.conv1.weight)
    assert torch.equal(tower.pos_embed, v.positional_embedding[1:])  # class row dropped, same grid
    assert torch.equal(tower.ln_pre.weight, v.ln_pre.weight)
    for ours, theirs in zip(tower.blocks, v.transformer.resblocks, strict=True):
        assert torch.equal(ours.attn.qkv.weight, theirs.attn.in_proj_weight)
        assert torch.equal(ours.attn.qkv.bias, theirs.attn.in_proj_bias)
        assert torch.equal(ours.attn.proj.weight, theirs.attn.out_proj.weight)
        assert torch.equal(ours.mlp.fc1.bias, theirs.mlp.c_fc.bias)
        assert torch.equal(ours.mlp.fc2.weight, theirs.mlp.c_proj.weight)
        assert torch.equal(ours.ln_2.bias, theirs.ln_2.bias)


def test_position_table_is_resized_to_pos_grid(openclip_checkpoint):
    _, _, reference = openclip_checkpoint
    tower = VisionTower(tower_cfg(pos_grid=8, ln_eps=1e-6))
    sd = openclip_to_tower_state_dict(reference.visual, tower)
    assert torch.equal(
        sd["pos_embed"], resize_pos_table(reference.visual.positional_embedding[1:].detach(), 64)
    )


def test_per_block_outputs_equal_on_identical_token_inputs(openclip_checkpoint):
    """OpenCLIP prepends a class token, so compare block by block: feed each pair of blocks the same
    patch tokens. OpenCLIP's LayerNorms use eps 1e-5 (Qwen-VL used 1e-6 on these weights), so the
    tower is built with 1e-5 here to compare exactly."""
    name, path, reference = openclip_checkpoint
    tower = VisionTower(tower_cfg(pos_grid=4, ln_eps=1e-5)).eval()
    load_openclip_vision(tower, name, path)
    v = reference.visual.eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        # Stem: conv + patch rows of the position table + ln_pre, without the class token.
        theirs = v.conv1(px).flatten(2).transpose(1, 2) + v.positional_embedding[1:]
        theirs = v.ln_pre(theirs)
        ours = tower.ln_pre(tower.patch_embed(px).flatten(2).transpose(1, 2) + tower.pos_embed)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
        x = torch.randn(2, 16, 64)
        for i, (b_ours, b_theirs) in enumerate(zip(tower.blocks, v.transformer.resblocks, strict=True)):
            torch.testing.assert_close(b_ours(x), b_theirs(x), atol=1e-5, rtol=1e-5, msg=f"block {i}")
            x = b_theirs(x)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_openclip_vision(VisionTower(tower_cfg(4, 1e-6)), "ViT-bigG-14", tmp_path / "nope.bin")


def test_shape_mismatch_is_rejected(openclip_checkpoint):
    _, _, reference = openclip_checkpoint
    wrong = VisionConfig(image_size=56, patch_size=14, width=64, layers=3, heads=4, mlp_dim=128, pos_grid=4)
    with pytest.raises(ValueError, match="does not match"):
        openclip_to_tower_state_dict(reference.visual, VisionTower(wrong))
