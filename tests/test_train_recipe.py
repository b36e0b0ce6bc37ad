"""Recipes: schema validation with suggestions, extends, typed overrides, the shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train.recipe import RecipeError, load_recipe, recipe_to_dict, save_resolved

REPO = Path(__file__).resolve().parents[1]
FULL_SCALE = [
    "pretrain.yaml",
    "multitask.yaml",
    "sft.yaml",
    "sft_lora.yaml",
    "sft_qlora.yaml",
    "dpo.yaml",
    "dpo_lora.yaml",
]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": {"preset": "tiny"}, "data": {"paths": ["x.json"]}, "train": {"steps": 3}}


def test_misspelt_key_is_an_error_that_suggests_the_right_one(tmp_path):
    f = write(tmp_path / "r.yaml", {**BASE, "optim": {"lrr": 1e-4}})
    with pytest.raises(RecipeError, match=r"r.yaml: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_recipe(f)


def test_misspelt_section_and_data_key_are_suggested(tmp_path):
    with pytest.raises(RecipeError, match=r"did you mean 'schedule'"):
        load_recipe(write(tmp_path / "a.yaml", {**BASE, "schedul": {}}))
    with pytest.raises(RecipeError, match=r"did you mean 'data.max_len'"):
        load_recipe(write(tmp_path / "b.yaml", {**BASE, "data": {"paths": [], "max_lenn": 3}}))


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    f = write(tmp_path / "r.yaml", {**BASE, "train": {"steps": "ten"}})
    with pytest.raises(RecipeError, match=r"'train.steps' must be integer or None|'train.steps' must be"):
        load_recipe(f)
    with pytest.raises(
        RecipeError,
        match=r"'freeze.vision' must be one of \['train', 'frozen'\], got 'froze' "
        r"\(did you mean 'frozen'\?\)",
    ):
        load_recipe(f.with_name("r.yaml"), ["train.steps=3", "freeze.vision=froze"])


def test_overrides_are_parsed_as_typed_values(tmp_path):
    f = write(tmp_path / "r.yaml", BASE)
    r = load_recipe(
        f, ["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "train.bf16=false", "lora.targets=[q_proj]"]
    )
    assert r.optim.lr == 3e-4 and r.optim.betas == (0.9, 0.95) and r.train.bf16 is False
    assert r.lora.targets == ["q_proj"]
    with pytest.raises(RecipeError, match=r"did you mean 'train.micro_batch'"):
        load_recipe(f, ["train.micro_bach=2"])


# Issue 27: a path in an override is kept whole. YAML read `runs/my run #1` as `runs/my run` (the rest a
# comment), split `[a,b.json]` in two and failed on an unquoted brace pattern. A string field now takes the
# text verbatim; a list of strings splits only at commas outside quotes, braces and brackets.
@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("checkpoint.out_dir=runs/my run #1", "checkpoint.out_dir", "runs/my run #1"),
        ("model.init_from=runs/sft,v2/final", "model.init_from", "runs/sft,v2/final"),
        ("data.system_message=You are #1: be brief.", "data.system_message", "You are #1: be brief."),
        ("checkpoint.out_dir='runs/quoted one'", "checkpoint.out_dir", "runs/quoted one"),
        ("log.run_name=it's #2", "log.run_name", "it's #2"),
        ("model.init_from=null", "model.init_from", None),
        ("data.paths=runs/a,b/train.json", "data.paths", ["runs/a,b/train.json"]),  # a plain string: one item
        ("data.paths=data/shard-{000..009}.tar", "data.paths", ["data/shard-{000..009}.tar"]),
        (
            "data.paths=[data/shard-{000..009}.tar, extra/more #2.json]",
            "data.paths",
            ["data/shard-{000..009}.tar", "extra/more #2.json"],
        ),
        ("data.paths=[shard-{a,b}.tar, c.json,]", "data.paths", ["shard-{a,b}.tar", "c.json"]),
        ("data.paths=[\"a,b.json\", 'c [1].json']", "data.paths", ["a,b.json", "c [1].json"]),
        ("eval.benches=vqav2_val", "eval.benches", ["vqav2_val"]),
        ("eval.benches=[]", "eval.benches", []),
        ("optim.betas=[0.9, 0.95]", "optim.betas", (0.9, 0.95)),  # not strings: YAML as before
        ("perf.liger_kernels=auto", "perf.liger_kernels", "auto"),
        ("perf.liger_kernels=false", "perf.liger_kernels", False),
    ],
)
def test_overrides_keep_paths_whole(tmp_path, override, field, expected):
    recipe = load_recipe(write(tmp_path / "r.yaml", BASE), [override])
    section, key = field.split(".")
    assert getattr(getattr(recipe, section), key) == expected


def test_a_plain_string_where_a_recipe_file_expects_a_list_is_a_one_item_list(tmp_path):
    f = write(tmp_path / "r.yaml", {**BASE, "data": {"paths": "data/shard-{000..009}.tar"}})
    assert load_recipe(f).data.paths == ["data/shard-{000..009}.tar"]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            'data.paths=[a.json, "b.json]',
            r"an unclosed \" in the list; quote each item .* e\.g\. 'data\.paths=\[\"runs/a,b",
        ),
        (
            "data.paths=[shard-{0..9.tar, b]",
            r"an unclosed \{ in the list; quote each item that holds a comma",
        ),
        ("data.paths=[a.json,,b.json]", r"an empty item in the list"),
        (
            "optim.betas=[0.9, 0.95",
            r"cannot read '\[0\.9, 0\.95' as tuple\[float, float\] .* e\.g\. 'optim\.betas=\[0\.9",
        ),
        (
            "train.bf16={",
            r"cannot read '\{' as bool .*quote the whole override for the shell, e\.g\. 'train\.bf16=true'",
        ),
        (
            'checkpoint.out_dir="runs/a \\q"',
            r'not a valid quoted string; inside double quotes write \\" for a quote',
        ),
    ],
)
def test_an_override_that_does_not_parse_says_what_to_quote_on_one_line(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(write(tmp_path / "r.yaml", BASE), [override])
    assert "\n" not in str(caught.value)


def test_a_bare_off_means_off_though_yaml_reads_it_as_false(tmp_path):
    """YAML 1.1 turns `check: off` (file or override) into False; a choice that has "off" takes it as that."""
    f = tmp_path / "r.yaml"
    f.write_text("model: {preset: tiny}\ndata: {paths: [x.json], check: off}\ntrain: {steps: 3}\n")
    assert load_recipe(f).data.check == "off"
    assert load_recipe(f, ["data.check=full"]).data.check == "full"
    assert load_recipe(f, ["data.check=off"]).data.check == "off"
    with pytest.raises(RecipeError, match=r"'freeze.vision' must be one of"):  # no "off" among its choices
        load_recipe(f, ["freeze.vision=off"])


def test_extends_deep_merges_and_the_child_wins(tmp_path):
    write(tmp_path / "base.yaml", {**BASE, "optim": {"lr": 1e-3, "weight_decay": 0.1}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "optim": {"lr": 5e-5}})
    r = load_recipe(child)
    assert r.optim.lr == 5e-5 and r.optim.weight_decay == 0.1 and r.model.preset == "tiny"


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", BASE), ["optim.lr=2e-4"])
    save_resolved(r, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert recipe_to_dict(again) == recipe_to_dict(r)


def test_inconsistent_recipes_are_rejected(tmp_path):
    f = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(RecipeError, match="exactly one of 'train.steps' and 'train.epochs'"):
        load_recipe(f, ["train.epochs=1"])
    with pytest.raises(RecipeError, match="needs 'lora.enabled: true'"):
        load_recipe(f, ["quantization.enabled=true"])


def test_pack_len_needs_packing_a_row_at_least_max_len_and_attention_confined_without_a_dense_mask(tmp_path):
    f = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(RecipeError, match="'data.pack_len' needs 'data.packing: true'"):
        load_recipe(f, ["data.pack_len=8192"])
    with pytest.raises(RecipeError, match=r"'data.pack_len' \(100\) must be >= 'data.max_len'"):
        load_recipe(f, ["data.packing=true", "data.pack_len=100"])
    with pytest.raises(RecipeError, match="dense 8192x8192 mask per row; use varlen or flex_attention"):
        load_recipe(f, ["data.packing=true", "data.pack_len=8192"])
    assert (
        load_recipe(f, ["data.packing=true", "data.pack_len=8192", "perf.attention=varlen"]).data.pack_len
        == 8192
    )


def test_micro_batches_bounded_by_tokens_need_packed_map_style_data(tmp_path):
    f = write(tmp_path / "r.yaml", BASE)
    for data in (["data.packing=false"], ["data.packing=true", "data.streaming=true"]):
        with pytest.raises(
            RecipeError, match="'train.micro_batch_tokens' bounds micro-batches of packed map"
        ):
            load_recipe(f, [*data, "train.micro_batch_tokens=4096"])
    assert (
        load_recipe(f, ["data.packing=true", "train.micro_batch_tokens=4096"]).train.micro_batch_tokens
        == 4096
    )


@pytest.mark.parametrize("name", FULL_SCALE)
def test_full_scale_recipes_load(name):
    load_recipe(REPO / "recipes" / name)


def test_full_scale_recipes_carry_the_papers_settings():
    pre, multi, sft = (load_recipe(REPO / "recipes" / n) for n in FULL_SCALE[:3])
    assert (pre.model.image_size, pre.data.image_size) == (224, 224)
    assert (pre.freeze.vision, pre.freeze.resampler, pre.freeze.llm) == ("train", "train", "frozen")
    assert pre.optim.betas == (0.9, 0.98) and pre.optim.eps == 1e-6 and pre.optim.weight_decay == 0.05
    assert (pre.optim.lr, pre.schedule.min_lr, pre.schedule.warmup_steps) == (2e-4, 1e-6, 500)
    assert pre.optim.vit_layer_decay == 0.95 and pre.optim.clip_grad == 1.0 and pre.train.bf16
    assert multi.data.image_size == 448 and (multi.freeze.vision, multi.freeze.llm) == ("train", "train")
    assert (multi.optim.lr, multi.schedule.min_lr, multi.schedule.warmup_steps) == (5e-5, 1e-5, 400)
    assert (sft.freeze.vision, sft.freeze.resampler, sft.freeze.llm) == ("frozen", "train", "train")
    assert (sft.optim.lr, sft.schedule.min_lr, sft.schedule.warmup_steps) == (1e-5, 1e-6, 3000)
    assert sft.train.stage == "sft"
    assert multi.model.init_from.startswith(pre.checkpoint.out_dir) and sft.model.init_from.startswith(
        multi.checkpoint.out_dir
    )


def test_dpo_recipes_start_from_the_sft_export_with_their_reference():
    dpo, lora = (load_recipe(REPO / "recipes" / n) for n in ("dpo.yaml", "dpo_lora.yaml"))
    sft = load_recipe(REPO / "recipes" / "sft.yaml")
    for r in (dpo, lora):
        assert r.train.stage == "dpo" and r.model.init_from.startswith(sft.checkpoint.out_dir)
        assert r.data.pack_len >= 2 * r.data.max_len and r.perf.attention == "varlen"
    assert (dpo.preference.reference, dpo.parallel.mode, dpo.freeze.llm) == ("frozen_copy", "zero3", "train")
    assert (lora.preference.reference, lora.lora.dropout, lora.freeze.llm) == (
        "adapter_disabled",
        0.0,
        "frozen",
    )


def test_inconsistent_preference_settings_are_rejected(tmp_path):
    f = write(tmp_path / "r.yaml", {**BASE, "train": {"steps": 3, "stage": "dpo"}})
    assert load_recipe(f).preference.reference == "auto"
    for override, message in [
        (
            "preference.reference=adapter_disabled",
            "'preference.reference: adapter_disabled' needs 'lora.enabled: true'",
        ),
        ("preference.beta=0", "'preference.beta' must be > 0"),
        ("preference.label_smoothing=0.5", r"'preference.label_smoothing' must be in \[0, 0.5\)"),
        (
            "data.packing=true",
            r"a packed row holds both sequences of a pair: set 'data.pack_len' >= 2 x 'data.max_len'",
        ),
        ("data.streaming=true", "reads preference pairs map-style"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(f, [override])
    with pytest.raises(RecipeError, match="applies to loss: sigmoid only"):
        load_recipe(f, ["preference.loss=ipo", "preference.label_smoothing=0.1"])
    with pytest.raises(RecipeError, match="use 'preference.reference: adapter_disabled'"):
        load_recipe(f, ["lora.enabled=true", "freeze.llm=frozen", "preference.reference=frozen_copy"])
    with pytest.raises(RecipeError, match="'lora.vision_targets' adapts a frozen vision tower"):
        load_recipe(f, ["lora.enabled=true", "freeze.vision=train", "lora.vision_targets=[attn.qkv]"])
    with pytest.raises(RecipeError, match=r"'preference.loss' must be one of \['sigmoid', 'ipo'\]"):
        load_recipe(f, ["preference.loss=hinge"])


@pytest.mark.parametrize(
    "name",
    [
        "pretrain.yaml",
        "multitask.yaml",
        "sft.yaml",
        "sft_lora.yaml",
        "dpo.yaml",
        "dpo_lora.yaml",
        "demo_pretrain.yaml",
        "demo_multitask.yaml",
        "demo_sft.yaml",
        "demo_dpo.yaml",
    ],
)
def test_tiny_recipes_load(name):
    load_recipe(REPO / "recipes" / "tiny" / name, ["model.init_from=x", "data.paths=[x.json]"])


def test_each_section_checks_its_own_rules_where_it_is_defined():
    """A section validates itself (ValueError naming the key), without a recipe around it; the recipe loader
    adds the file and keeps only the rules that tie sections together."""
    from data.dataset import DataConfig
    from train.recipe import ModelSection, PreferenceSection, TrainSection

    cases = [
        (DataConfig(paths=[], pack_len=4096), "'data.pack_len' needs 'data.packing: true'"),
        (
            DataConfig(paths=[], packing=True, max_len=2048, pack_len=1024),
            r"'data.pack_len' \(1024\) must be >=",
        ),
        (TrainSection(steps=10, epochs=1.0), "set exactly one of 'train.steps' and 'train.epochs'"),
        (TrainSection(steps=10, micro_batch=0), "'train.micro_batch' must be >= 1"),
        (TrainSection(steps=10, micro_batch_tokens=0), "'train.micro_batch_tokens' must be >= 1"),
        (
            ModelSection(openclip_name="ViT-bigG-14", preset="tiny"),
            "'model.openclip_name' and 'model.openclip_checkpoint'",
        ),
        (PreferenceSection(beta=0.0), "'preference.beta' must be > 0"),
    ]
    for section, message in cases:
        with pytest.raises(ValueError, match=message):
            section.validate()
    DataConfig(paths=[], packing=True, pack_len=8192).validate()
    TrainSection(steps=1).validate()


def test_a_packed_row_holds_pack_len_tokens_else_max_len():
    from data.dataset import DataConfig

    assert DataConfig(paths=[], max_len=2048).row_len == 2048
    assert DataConfig(paths=[], max_len=2048, packing=True, pack_len=8192).row_len == 8192
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "sft.yaml",
        ["model.preset=tiny", "data.packing=true", "data.pack_len=512", "perf.attention=varlen"],
    )
    assert isinstance(recipe.data, DataConfig) and recipe.data.row_len == 512
