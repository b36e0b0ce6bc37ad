"""Initialise the vision tower from an OpenCLIP ViT (e.g. ViT-bigG-14), the way Qwen-VL did.

Everything but the class token is kept: the class row of the position table is dropped and the
patch rows are bicubically resized to ``pos_grid``; OpenCLIP's final ``ln_post``/``proj`` (at CLIP's
embedding width) are not used by Qwen-VL's tower and are dropped too. The Linear layouts agree:
OpenCLIP's ``in_proj_weight`` is [q; k; v] with each head contiguous, exactly our ``attn.qkv``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.vision import VisionTower, resize_pos_table


def build_openclip_model(model_name: str, checkpoint_path: str | Path) -> nn.Module:
    """An OpenCLIP model with weights from a local file (never downloaded)."""
    import open_clip  # optional heavy dependency: only an OpenCLIP initialisation imports it (seconds)

    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(
            f"{checkpoint_path}: OpenCLIP checkpoint not found (weights are never downloaded)"
        )
    return open_clip.create_model(model_name, pretrained=str(checkpoint_path), weights_only=True)


def _check_compatible(visual: nn.Module, tower: VisionTower) -> None:
    cfg = tower.cfg
    blocks = visual.transformer.resblocks
    found = {
        "width": visual.conv1.out_channels,
        "patch_size": visual.conv1.kernel_size[0],
        "layers": len(blocks),
        "heads": blocks[0].attn.num_heads,
        "mlp_dim": blocks[0].mlp.c_fc.out_features,
    }
    wanted = {k: getattr(cfg, k) for k in found}
    if found != wanted:
        raise ValueError(f"OpenCLIP vision tower {found} does not match VisionConfig {wanted}")
    if visual.conv1.bias is not None or getattr(visual, "class_embedding", None) is None:
        raise ValueError("expected an OpenCLIP ViT with a bias-free conv1 and a class token")
    act = blocks[0].mlp.gelu
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        raise ValueError(f"OpenCLIP model uses {act!r}; the tower needs exact GELU (no QuickGELU)")
    if not (isinstance(blocks[0].ls_1, nn.Identity) and isinstance(blocks[0].ls_2, nn.Identity)):
        raise ValueError("OpenCLIP blocks with LayerScale cannot be mapped onto the tower")


def openclip_to_tower_state_dict(visual: nn.Module, tower: VisionTower) -> dict[str, torch.Tensor]:
    """Tower state dict (our names) from an OpenCLIP ``model.visual``."""
    _check_compatible(visual, tower)
    patch_rows = visual.positional_embedding.detach()[1:]  # row 0 belongs to the class token
    sd = {
        "patch_embed.weight": visual.conv1.weight,
        "pos_embed": resize_pos_table(patch_rows, tower.cfg.pos_grid**2),
        "ln_pre.weight": visual.ln_pre.weight,
        "ln_pre.bias": visual.ln_pre.bias,
    }
    renames = {
        "ln_1": "ln_1", "ln_2": "ln_2",
        "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
        "attn.out_proj": "attn.proj",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }  # fmt: skip
    for i, block in enumerate(visual.transformer.resblocks):
        for name, tensor in block.state_dict().items():
            for theirs, ours in renames.items():
                if name.startswith(theirs):
                    sd[f"blocks.{i}.{ours}{name[len(theirs) :]}"] = tensor
                    break
            else:
                raise ValueError(f"unmapped OpenCLIP parameter transformer.resblocks.{i}.{name}")
    return {k: v.detach() for k, v in sd.items()}


def load_openclip_vision(tower: VisionTower, model_name: str, checkpoint_path: str | Path) -> None:
    """Copy an OpenCLIP checkpoint's vision weights into ``tower`` (strict: every tower tensor is set)."""
    visual = build_openclip_model(model_name, checkpoint_path).visual
    tower.load_state_dict(openclip_to_tower_state_dict(visual, tower), strict=True)
