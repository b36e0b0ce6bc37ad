"""The benchmark registry: name -> data files, prompt, generation budget, kind and metric.

Paths are relative to --data-root, laid out as the reference's eval_mm/data/ directory (so a copy of
that directory works as a data root). Token budgets and prompts are the reference's (section 5).
"""

from dataclasses import dataclass

from models.errors import UserError

# Prompt bodies; {image} is the image path, other fields come from the record.
VQA_PROMPT = "<img>{image}</img>{question} Answer:"
CAPTION_PROMPT = "<img>{image}</img>Describe the image in English:"
GROUNDING_PROMPT = "<img>{image}</img><ref>{sent}</ref><box>"
CHOICE_PROMPT = "<img>{image}</img>Context: {hint}\nQuestion: {question}\nOptions: {options}\nAnswer:"
MME_PROMPT = "<img>{image}</img>\n{question}"
SEED_PROMPT = "{prompt}"  # SEED-Bench records carry their full prompt (reference trans.py)


@dataclass(frozen=True)
class Benchmark:
    name: str
    # Record format, i.e. which loader in eval_mm.datasets reads the files:
    # "vqa_jsonl" | "coco_caption" | "grounding_jsonl" | "choice_jsonl" | "seed_jsonl" | "mme_dir" |
    # "preference_json"
    format: str
    test_file: str  # what the model is asked about
    metric: str  # a key of eval_mm.metrics.METRICS
    prompt: str
    # "generate" (greedy decoding), "choice" (likelihood ranking of letters) or "preference" (log-prob of
    # the chosen vs the rejected answer of a pair, eval_mm.preference)
    kind: str = "generate"
    annotation_file: str | None = None  # ground truth when it is not in test_file (official VQA/DocVQA json)
    max_new_tokens: int = 10
    min_new_tokens: int = 1

    @property
    def references_file(self) -> str:
        return self.annotation_file or self.test_file


def _vqa(name, test, metric, max_new_tokens, annotation=None):
    return Benchmark(
        name, "vqa_jsonl", test, metric, VQA_PROMPT, annotation_file=annotation, max_new_tokens=max_new_tokens
    )


def _refcoco(dataset: str, split: str) -> Benchmark:
    name = f"{dataset}_{split}"
    return Benchmark(
        name,
        "grounding_jsonl",
        f"{dataset}/{name}.jsonl",
        "grounding",
        GROUNDING_PROMPT,
        max_new_tokens=28,
        min_new_tokens=10,
    )


def _caption(name, test):
    return Benchmark(
        name, "coco_caption", test, "caption", CAPTION_PROMPT, max_new_tokens=30, min_new_tokens=8
    )


def _choice(name, test, metric="choice_accuracy", fmt="choice_jsonl", prompt=CHOICE_PROMPT):
    return Benchmark(name, fmt, test, metric, prompt, kind="choice")


_ALL = [
    _vqa(
        "vqav2_val", "vqav2/vqav2_val.jsonl", "vqa_accuracy", 10, "vqav2/v2_mscoco_val2014_annotations.json"
    ),
    _vqa("okvqa_val", "okvqa/okvqa_val.jsonl", "vqa_accuracy", 10, "okvqa/mscoco_val2014_annotations.json"),
    _vqa(
        "textvqa_val", "textvqa/textvqa_val.jsonl", "vqa_accuracy", 10, "textvqa/textvqa_val_annotations.json"
    ),
    _vqa("vizwiz_val", "vizwiz/vizwiz_val.jsonl", "vqa_accuracy", 10, "vizwiz/vizwiz_val_annotations.json"),
    _vqa("docvqa_val", "docvqa/val.jsonl", "anls", 100, "docvqa/val/val_v1.0.json"),
    _vqa(
        "infovqa_val",
        "infographicsvqa/val.jsonl",
        "anls",
        100,
        "infographicsvqa/val/infographicsVQA_val_v1.0.json",
    ),
    _vqa("chartqa_test_human", "chartqa/test_human.jsonl", "relaxed_accuracy", 100),
    _vqa("chartqa_test_augmented", "chartqa/test_augmented.jsonl", "relaxed_accuracy", 100),
    _vqa("gqa_testdev", "gqa/testdev_balanced.jsonl", "gqa_accuracy", 10),
    _vqa("ocrvqa_val", "ocrvqa/ocrvqa_val.jsonl", "exact_match", 100),
    _vqa("ocrvqa_test", "ocrvqa/ocrvqa_test.jsonl", "exact_match", 100),
    _vqa("ai2diagram_test", "ai2diagram/test.jsonl", "exact_match", 10),
    _caption("flickr30k", "flickr30k/flickr30k_karpathy_test.json"),
    _caption("nocaps", "nocaps/nocaps_val.json"),
    *[_refcoco("refcoco", s) for s in ("val", "testA", "testB")],
    *[_refcoco("refcoco+", s) for s in ("val", "testA", "testB")],
    *[_refcoco("refcocog", s) for s in ("val", "test")],
    _choice("scienceqa_img", "scienceqa/scienceqa_test_img.jsonl"),
    _choice("seed_bench_img", "seed_bench/image_input.jsonl", fmt="seed_jsonl", prompt=SEED_PROMPT),
    _choice("mmbench_dev", "mmbench/mmbench_dev_20230712.jsonl", metric="circular_accuracy"),
    # MME: the reference asked Qwen-VL-Chat (ChatML); the parser only reads the first 4 characters.
    Benchmark("mme", "mme_dir", "mme/Your_Results", "mme", MME_PROMPT, max_new_tokens=20),
    # Synthetic sets written by `python -m data.synthetic --out DATA_ROOT/synthetic` (CI and demo);
    # their image paths are relative to that folder.
    _caption("synth_caption", "synthetic/caption_test.json"),
    _vqa("synth_vqa", "synthetic/vqa_test.jsonl", "vqa_accuracy", 10, "synthetic/vqa_test_annotations.json"),
    Benchmark(
        "synth_grounding",
        "grounding_jsonl",
        "synthetic/grounding_test.jsonl",
        "grounding",
        GROUNDING_PROMPT,
        max_new_tokens=28,
        min_new_tokens=10,
    ),
    _choice("synth_mc", "synthetic/mc_test.jsonl"),
    # Held-out preference pairs (the DPO stage's): share of pairs whose chosen answer is the likelier.
    Benchmark(
        "synth_preference", "preference_json", "synthetic/dpo_test.json", "preference", "", kind="preference"
    ),
]
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}


class UnknownBenchmarkError(UserError, KeyError):
    """A benchmark name that is not in the registry (a KeyError too, for callers that look names up)."""


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def parse_bench_list(spec: str) -> list[Benchmark]:
    """'a,b,c' -> benchmarks, in order, without duplicates."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"no benchmark names in {spec!r}; see `python -m eval_mm list`")
    return [get_benchmark(n) for n in dict.fromkeys(names)]
