"""The vision tower: patch grid, position-table resizing, block semantics, gradient checkpointing."""

import torch
import torch.nn.functional as F

from models.config import VisionConfig
from models.vision import ResizedPosTable, VisionTower, resize_pos_table

CFG = VisionConfig(image_size=84, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64, pos_grid=4)


def test_output_is_one_feature_per_patch_without_class_token():
    tower = VisionTower(CFG)
    assert tower(torch.randn(3, 3, 84, 84)).shape == (3, 36, 32)
    assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 16, 32)  # pos table used as is (4x4)


def test_pos_table_resize_is_float32_bicubic_and_identity_at_equal_size():
    table = torch.randn(16, 8, dtype=torch.bfloat16)
    assert resize_pos_table(table, 16) is table
    resized = resize_pos_table(table, 36)
    expected = (
        F.interpolate(table.float().T.reshape(1, 8, 4, 4), size=(6, 6), mode="bicubic", align_corners=False)
        .reshape(8, 36)
        .T.to(torch.bfloat16)
    )
    assert resized.dtype == torch.bfloat16
    assert torch.equal(resized, expected)


def test_a_table_that_does_not_train_is_resized_once_and_again_when_it_changes():
    """Frozen tables (the ViT's in SFT, the resampler's sin-cos buffer) are resized once per size; a write
    into the table (loading weights) or a new size resizes again; a training table is never cached."""
    table, resized = torch.randn(16, 8), ResizedPosTable()
    first = resized(table, 36)
    assert torch.equal(first, resize_pos_table(table, 36)) and resized(table, 36) is first
    assert resized(table, 64).shape == (64, 8)
    table.copy_(torch.randn(16, 8))  # what load_state_dict does
    assert torch.equal(resized(table, 36), resize_pos_table(table, 36))
    trained = torch.randn(16, 8, requires_grad=True)
    resized(trained, 36).sum().backward()
    assert trained.grad is not None and resized(trained, 36) is not resized(trained, 36)


def test_frozen_tower_gives_the_same_features_as_a_fresh_resize_after_new_weights():
    tower = VisionTower(CFG).requires_grad_(False)
    px = torch.randn(2, 3, 84, 84)
    tower(px)
    tower.load_state_dict({k: torch.randn_like(v) for k, v in tower.state_dict().items()})
    fresh = VisionTower(CFG)
    fresh.load_state_dict(tower.state_dict())
    torch.testing.assert_close(tower(px), fresh(px))


def test_tower_matches_a_plain_pre_ln_vit():
    """Re-derive the forward with explicit ops: conv, + resized pos, ln_pre, pre-LN blocks, exact GELU."""
    torch.manual_seed(0)
    tower = VisionTower(CFG).double()
    px = torch.randn(2, 3, 84, 84, dtype=torch.float64)
    x = F.conv2d(px, tower.patch_embed.weight, stride=14).flatten(2).transpose(1, 2)
    x = x + resize_pos_table(tower.pos_embed, 36)
    x = F.layer_norm(x, (32,), tower.ln_pre.weight, tower.ln_pre.bias, eps=1e-6)
    for blk in tower.blocks:
        h = F.layer_norm(x, (32,), blk.ln_1.weight, blk.ln_1.bias, eps=1e-6)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)  # [q; k; v] rows
        split = lambda t: t.reshape(2, 36, 4, 8).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 8**0.5, dim=-1)
        o = (att @ split(v)).transpose(1, 2).reshape(2, 36, 32)
        x = x + blk.attn.proj(o)
        h = F.layer_norm(x, (32,), blk.ln_2.weight, blk.ln_2.bias, eps=1e-6)
        x = x + blk.mlp.fc2(0.5 * blk.mlp.fc1(h) * (1 + torch.erf(blk.mlp.fc1(h) / 2**0.5)))
    torch.testing.assert_close(tower(px), x, atol=1e-10, rtol=1e-10)


def test_gradient_checkpointing_gives_identical_outputs_and_grads():
    torch.manual_seed(0)
    tower = VisionTower(CFG).train()
    px = torch.randn(2, 3, 84, 84)
    tower(px).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    tower.gradient_checkpointing = True
    tower(px).square().sum().backward()
    for n, p in tower.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_parameter_names_follow_the_design_contract():
    names = set(dict(VisionTower(CFG).named_parameters()))
    expected = {"patch_embed.weight", "pos_embed", "ln_pre.weight", "ln_pre.bias"}
    for i in range(2):
        for sub in ("ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    assert names == expected
