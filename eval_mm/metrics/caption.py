"""Captioning metrics through pycocoevalcap (BLEU-1..4, METEOR, ROUGE_L, CIDEr).

pycocoevalcap's PTBTokenizer (and METEOR) shell out to Java. When Java is missing we fall back to a
pure-Python tokenizer that mimics what PTBTokenizer does to captions (lower-case, split off
punctuation, drop punctuation tokens); scores can then differ slightly from the official ones, and a
message says so.
"""

import re
import shutil
import sys

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

# The punctuation tokens PTBTokenizer drops after tokenising (pycocoevalcap/tokenizer/ptbtokenizer.py).
PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
# Words, PTB-style clitics ("don't" -> "do n't", "dog's" -> "dog 's"), and single symbols.
_WORD_PATTERN = re.compile(r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+|[^\sa-z0-9]")


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Java-free stand-in for PTBTokenizer.tokenize: same input/output shape."""
    out = {}
    for key, texts in captions.items():
        out[key] = []
        for text in texts:
            tokens = _WORD_PATTERN.findall(text.lower().replace("\n", " "))
            # PTB drops its punctuation tokens; brackets become -LRB- etc. and are dropped too.
            kept = [t for t in tokens if t not in PTB_PUNCTUATION and t not in {"(", ")", "[", "]", "{", "}"}]
            out[key].append(" ".join(kept))
    return out


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], with_meteor: bool = False
) -> dict[str, float]:
    """Corpus-level caption metrics (x100). predictions/references are keyed by image id."""
    gts = {k: list(v) for k, v in references.items()}
    res = {k: [predictions[k]] for k in references}
    if java_available():
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
        tokenizer_name = "ptb"
    else:
        print(
            "eval_mm: Java not found; captions are tokenised with the pure-Python PTB approximation "
            "(scores may differ slightly from the official Java tokenizer; METEOR skipped).",
            file=sys.stderr,
        )
        gts, res = simple_ptb_tokenize(gts), simple_ptb_tokenize(res)
        tokenizer_name = "python_fallback"
        with_meteor = False

    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        metrics[f"BLEU_{n}"] = 100.0 * value
    metrics["ROUGE_L"] = 100.0 * Rouge().compute_score(gts, res)[0]
    metrics["CIDEr"] = 100.0 * Cider().compute_score(gts, res)[0]
    if with_meteor:
        metrics["METEOR"] = 100.0 * Meteor().compute_score(gts, res)[0]
    metrics["tokenizer"] = tokenizer_name
    return metrics
