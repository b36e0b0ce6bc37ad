"""Configuration of a VLM: vision tower, resampler, and the Hugging Face config of the LLM.

Plain dataclasses with a JSON round trip (``to_dict`` / ``from_dict``, ``save`` / ``load``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from models.errors import UserError


@dataclass
class VisionConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_dim: int = 8192
    pos_grid: int = 16  # side of the learned position table (16x16 = 224 px / 14); resized to the patch grid
    ln_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class ResamplerConfig:
    num_queries: int = 256  # = number of <imgpad> slots per image; must be a square (sin-cos grid)
    head_dim: int = 128  # heads = d_llm // head_dim
    ln_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return int(round(self.num_queries**0.5))

    def __post_init__(self) -> None:
        if self.grid**2 != self.num_queries:
            raise ValueError(f"num_queries {self.num_queries} must be a perfect square")


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    text_config: dict[str, Any] = field(default_factory=dict)  # a HF config dict, with "model_type"
    image_start_id: int | None = None  # <img>
    image_end_id: int | None = None  # </img>
    image_pad_id: int | None = None  # <imgpad>
    pad_token_id: int | None = None
    # True when special tokens were added to a base tokenizer: embeddings and LM head must train.
    train_embeddings: bool = False
    attn_implementation: str = "sdpa"

    @property
    def hidden_size(self) -> int:
        """The LLM hidden size d, which is also the resampler width."""
        return int(self.text_config["hidden_size"])

    @property
    def num_image_tokens(self) -> int:
        """Number of <imgpad> slots per image."""
        return self.resampler.num_queries

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "vlrecipe_vlm", **copy.deepcopy(asdict(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        d = dict(d)
        d.pop("model_type", None)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VLMConfig keys {sorted(unknown)}")
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["resampler"] = ResamplerConfig(**d.get("resampler", {}))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{path}: not a valid VLM config: {e}") from e
