"""Which parameters train: decided here and only here, from the recipe's ``freeze`` section.

Groups come from ``VLM.module_groups()``: vision, resampler, llm, and embeddings (input embeddings
+ LM head, a subset of llm). The order of application is vision, resampler, llm, then embeddings, so
``llm: frozen`` + ``embeddings: train`` trains only the embeddings and head of the LLM.
"""

from __future__ import annotations

from torch import nn

from train.recipe import FreezeSection


def embeddings_train(cfg: FreezeSection, train_embeddings_flag: bool) -> bool:
    """Whether the input embeddings and LM head train. "auto": with the LLM, or whenever special tokens
    were added to a base tokenizer (their new rows are random and must learn)."""
    if cfg.embeddings == "auto":
        return cfg.llm == "train" or train_embeddings_flag
    return cfg.embeddings == "train"


def group_decisions(model: nn.Module, cfg: FreezeSection) -> dict[str, bool]:
    """{group: trains} for a VLM under the recipe's freeze section."""
    return {
        "vision": cfg.vision == "train",
        "resampler": cfg.resampler == "train",
        "llm": cfg.llm == "train",
        "embeddings": embeddings_train(cfg, bool(getattr(model.config, "train_embeddings", False))),
    }


def trainable_modules(model: nn.Module, cfg: FreezeSection) -> list[nn.Module]:
    """The modules whose parameters will train: the trainer keeps them in fp32 (the optimiser's master
    weights) while frozen ones are stored in bf16 (perf.frozen_bf16)."""
    groups, decision = model.module_groups(), group_decisions(model, cfg)
    return [m for group, trains in decision.items() if trains for m in groups[group]]


def apply_freezing(model: nn.Module, cfg: FreezeSection) -> dict[str, bool]:
    """Set ``requires_grad`` on every parameter of ``model`` (a VLM). Returns {group: trains}."""
    groups = model.module_groups()
    decision = group_decisions(model, cfg)
    model.requires_grad_(False)
    for group in ("vision", "resampler", "llm", "embeddings"):
        for module in groups[group]:
            module.requires_grad_(decision[group])
    return decision


def trainable_table(model: nn.Module) -> str:
    """A table of trainable / total parameters per top-level module group (and LoRA adapters)."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        group = group_of(name)
        counts = rows.setdefault(group, [0, 0])
        counts[1] += param.numel()
        if param.requires_grad:
            counts[0] += param.numel()
    trainable = sum(r[0] for r in rows.values())
    total = sum(r[1] for r in rows.values())
    lines = [f"{'group':<22}{'trainable':>16}{'total':>16}{'%':>8}"]
    for group, (t, n) in rows.items():
        lines.append(f"{group:<22}{t:>16,}{n:>16,}{100 * t / max(n, 1):>7.1f}%")
    lines.append(f"{'all':<22}{trainable:>16,}{total:>16,}{100 * trainable / max(total, 1):>7.1f}%")
    return "\n".join(lines)


def group_of(name: str) -> str:
    # peft wraps the model: strip its prefixes so groups read the same with and without LoRA; a Hugging Face
    # family's parts sit under hf.model. (visual, language_model) and hf. (lm_head).
    for prefix in ("base_model.model.", "module.", "hf.model.", "hf."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if "lora_" in name:
        return "vision (lora adapters)" if name.startswith(("vision.", "visual.")) else "llm (lora adapters)"
    if "embed_tokens" in name or "lm_head" in name:
        return "llm (embeddings/head)"
    return name.split(".", 1)[0]
