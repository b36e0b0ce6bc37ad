"""The dataset check's report: one JSON-able dict, rendered as text, written as
``data_check.json`` + ``data_check.txt`` (+ ``data_check_lengths.png`` with matplotlib).

Pass or fail: the check fails when more than ``max_error_fraction`` of the records have an error
(PROBLEMS[kind].error), or when more samples reference a missing or undecodable image than
``data.max_bad_images`` lets training skip (a run would stop there). Image problems are judged by the
second rule only, so a data set whose few bad images max_bad_images allows passes, as training would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.check.problems import IMAGE_PROBLEMS, PROBLEMS
from data.packing import plan_rows
from data.sampler import ResumableSampler, token_batches
from models.errors import UserError

if TYPE_CHECKING:
    from data.check.run import CheckOptions, Totals
    from data.dataset import DataConfig

REPORT_NAME = "data_check"


@dataclass
class CheckReport:
    report: dict[str, Any]  # the JSON report (keys documented in docs/data.md)
    full_lengths: np.ndarray  # tokens per sample before truncation (for the plot)

    @property
    def passed(self) -> bool:
        return self.report["result"]["passed"]

    def summary(self) -> str:
        """One line: the verdict and its reasons."""
        r = self.report["result"]
        verdict = "passed" if r["passed"] else "failed"
        reasons = (
            "; ".join(r["failures"])
            if r["failures"]
            else (
                f"{r['error_records']:,} of {self.report['records']:,} records with errors "
                f"(threshold {100 * r['max_error_fraction']:.3g}%)"
            )
        )
        return f"data check ({self.report['check']['mode']}) {verdict}: {reasons}"

    def first_error(self) -> str | None:
        """``where: message`` of the first example of the first error kind found, None without errors."""
        for problem in self.report["problems"].values():
            if problem["severity"] == "error" and problem["examples"]:
                example = problem["examples"][0]
                return f"{example['where']}: {example['message']}"
        return None

    def text(self) -> str:
        return render_text(self.report)

    def write(self, out_dir: str | Path, plot: bool = False) -> list[Path]:
        """Write the JSON and text reports (and the length histogram PNG) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / f"{REPORT_NAME}.json", out / f"{REPORT_NAME}.txt"]
        written[0].write_text(json.dumps(self.report, indent=2) + "\n")
        written[1].write_text(self.text() + "\n")
        if plot:
            written.append(
                plot_lengths(
                    self.full_lengths, self.report["data"]["max_len"], out / f"{REPORT_NAME}_lengths.png"
                )
            )
        return written


def build_report(
    totals: Totals,
    config: DataConfig,
    options: CheckOptions,
    num_image_tokens: int | None,
    images_checked: int,
    bad_image_samples: int,
    seconds: dict[str, float],
    workers: int,
) -> CheckReport:
    full = np.frombuffer(totals.full_len, dtype=np.int32) if len(totals.full_len) else np.zeros(0, np.int32)
    kept = np.frombuffer(totals.kept_len, dtype=np.int32) if len(totals.kept_len) else np.zeros(0, np.int32)
    supervised = (
        int(np.sum(np.frombuffer(totals.supervised, dtype=np.int32), dtype=np.int64)) if len(kept) else 0
    )
    used = int(kept.sum(dtype=np.int64))
    error_fraction = totals.error_records / totals.records
    failures = []
    if error_fraction > options.max_error_fraction:
        failures.append(
            f"{totals.error_records:,} of {totals.records:,} records ({100 * error_fraction:.3g}%) "
            f"have errors, more than {100 * options.max_error_fraction:.3g}% allowed"
        )
    if bad_image_samples > config.max_bad_images:
        failures.append(
            f"{bad_image_samples:,} samples reference a missing or undecodable image; "
            f"data.max_bad_images={config.max_bad_images} lets training skip that many"
        )
    problems = {}
    for kind, problem in PROBLEMS.items():
        if totals.problems[kind]:
            problems[kind] = {
                "severity": "error" if problem.error else "warning",
                "count": totals.problems[kind],
                "counts": "image files" if kind in IMAGE_PROBLEMS else "records",
                "meaning": problem.meaning,
                "examples": [{"where": w, "message": m} for w, m in totals.examples.get(kind, [])],
            }
    report = {
        "data": {
            "paths": list(config.paths),
            "format": config.format,
            "streaming": config.streaming,
            "max_len": config.max_len,
            "packing": config.packing,
            "pack_len": config.pack_len,
            "assistant_only": config.assistant_only,
            "image_root": config.image_root,
            "max_bad_images": config.max_bad_images,
            "num_image_tokens": num_image_tokens,
        },
        "check": {
            "mode": options.mode,
            "limit": options.limit,
            "image_sample": options.image_sample,
            "workers": workers,
        },
        "records": totals.records,
        "samples": len(full),
        "formats": dict(totals.formats.most_common()),
        "tasks": dict(totals.tasks.most_common()),
        "images_per_sample": {str(k): v for k, v in sorted(totals.images_per_sample.items())},
        "tokens": {
            "before_truncation": _distribution(full),
            "histogram": length_histogram(full, config.max_len),
            "used": used,  # after truncation and drops: what training computes the loss over
            "supervised": supervised,
            "supervised_fraction": supervised / used if used else 0.0,
        },
        "batches": batch_padding(kept, config, options.micro_batch, options.micro_batch_tokens),
        "problems": problems,
        "images": {
            "distinct": len(totals.image_ids),
            "checked": images_checked,
            "how": "decoded" if options.mode == "full" else "exists",
            "samples_with_bad_images": bad_image_samples,
        },
        "result": {
            "passed": not failures,
            "failures": failures,
            "error_records": totals.error_records,
            "error_fraction": error_fraction,
            "max_error_fraction": options.max_error_fraction,
        },
        "timing": {
            "text_seconds": round(seconds["text"], 3),
            "records_per_second": round(totals.records / max(seconds["text"], 1e-9)),
            "image_seconds": round(seconds["images"], 3),
            "images_per_second": round(images_checked / max(seconds["images"], 1e-9))
            if images_checked
            else None,
        },
    }
    return CheckReport(report, full)


def _distribution(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {"samples": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {
        "samples": len(lengths),
        "total": int(lengths.sum(dtype=np.int64)),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(lengths.max()),
    }


def length_histogram(lengths: np.ndarray, max_len: int) -> list[dict[str, int]]:
    """Samples per token-length bin ``from..to`` (inclusive): up to 16, 32, 64, ... tokens, with max_len
    as a bin end (the bins past it hold the samples training truncates)."""
    if not len(lengths):
        return []
    top = int(lengths.max())
    ends = {max_len}
    end = 16
    while end < top:
        ends.add(end)
        end *= 2
    ends.add(end)
    edges = [0] + [e + 1 for e in sorted(ends)]  # numpy bins are [lo, hi): end e -> edge e + 1
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": lo, "to": hi - 1, "samples": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)]


def batch_padding(
    kept: np.ndarray, config: DataConfig, micro_batch: int, micro_batch_tokens: int | None = None
) -> dict[str, Any]:
    """Token slots the batches of one epoch would hold (samples dealt in the sampler's epoch-0 order on
    one rank, micro_batch at a time, or as the trainer bounds them by ``micro_batch_tokens``; padded to the
    longest sample, or packed into rows of pack_len and padded to the longest row) and the fraction of them
    that is padding."""
    out: dict[str, Any] = {"micro_batch": micro_batch, "packing": config.packing}
    if micro_batch_tokens is not None:
        out["micro_batch_tokens"] = micro_batch_tokens
    if not len(kept) or not kept.any():
        return out
    lengths = np.minimum(kept, config.max_len)
    sampler = ResumableSampler(
        len(kept),
        seed=config.seed,
        shuffle=config.shuffle,
        lengths=lengths.tolist() if config.group_by_length else None,
    )
    order = sampler.epoch_order(0)
    if micro_batch_tokens is None:
        batches = [order[start : start + micro_batch] for start in range(0, len(order), micro_batch)]
    else:
        batches = token_batches(order, lengths.tolist(), micro_batch_tokens, micro_batch)
    row_len = config.row_len
    slots = 0
    for indices in batches:
        batch = [int(kept[i]) for i in indices if kept[i] > 0]  # 0: dropped
        if not batch:
            continue
        if config.packing:
            rows = plan_rows(batch, row_len)
            slots += len(rows) * max(sum(batch[i] for i in row) for row in rows)
        else:
            slots += len(batch) * max(batch)
    used = int(kept[order].sum(dtype=np.int64))  # the sampler's order (it may repeat a few to fill a round)
    out.update({"token_slots": slots, "padding_fraction": round(1 - used / slots, 4)})
    return out


def plot_lengths(lengths: np.ndarray, max_len: int, path: Path) -> Path:
    """A PNG histogram of tokens per sample with max_len marked (needs matplotlib: the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("--plot needs matplotlib: pip install 'vlrecipe[plot]'") from e
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(lengths, bins=60, range=(0, 1.05 * max(max_len, int(lengths.max(initial=0)))), color="#4477aa")
    ax.axvline(max_len, color="#cc3311", linestyle="--", label=f"max_len {max_len}")
    ax.set_xlabel("tokens per sample (before truncation)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ text


def render_text(r: dict[str, Any]) -> str:
    d, t = r["data"], r["tokens"]
    packing = f"packing (rows of {d['pack_len'] or d['max_len']})" if d["packing"] else "no packing"
    lines = [
        f"data check ({r['check']['mode']}) of {', '.join(d['paths'])}",
        f"  max_len {d['max_len']}, {packing}, "
        + (
            f"{d['num_image_tokens']} tokens per image"
            if d["num_image_tokens"] is not None
            else "each image its own grid's tokens"
        ),
        f"records: {r['records']:,}  samples: {r['samples']:,}",
        "by format: " + _counts(r["formats"]),
        "by task:   " + _counts(r["tasks"]),
        "images per sample: " + _counts(r["images_per_sample"]),
    ]
    b = t["before_truncation"]
    if b["samples"]:
        lines.append(
            f"tokens per sample before truncation: mean {b['mean']}, p50 {b['p50']}, p90 {b['p90']}, "
            f"p99 {b['p99']}, max {b['max']}"
        )
        lines += _histogram_lines(t["histogram"], d["max_len"])
        lines.append(
            f"supervised: {100 * t['supervised_fraction']:.1f}% of the {t['used']:,} tokens training "
            f"uses ({t['supervised']:,})"
        )
    batches = r["batches"]
    if "padding_fraction" in batches:
        bound = batches.get("micro_batch_tokens")
        size = (
            f"at most {batches['micro_batch']} samples and {bound:,} tokens"
            if bound
            else batches["micro_batch"]
        )
        lines.append(
            f"batches of {size} (epoch-0 order, one rank): "
            f"{100 * batches['padding_fraction']:.1f}% of {batches['token_slots']:,} token slots are padding"
        )
    im = r["images"]
    lines.append(
        f"images: {im['distinct']:,} distinct, {im['checked']:,} checked ({im['how']}), "
        f"{im['samples_with_bad_images']:,} samples reference a bad one"
    )
    if r["problems"]:
        lines.append("problems:")
        for kind, p in r["problems"].items():
            lines.append(
                f"  {p['severity']:<7} {kind:<24} {p['count']:>10,} {p['counts']:<11} {p['meaning']}"
            )
            lines += [f"            {e['where']}: {e['message']}" for e in p["examples"]]
    else:
        lines.append("problems: none")
    tm = r["timing"]
    rate = (
        f"; images {tm['image_seconds']:.1f} s ({tm['images_per_second']:,}/s)"
        if tm["images_per_second"]
        else ""
    )
    lines.append(
        f"time: text {tm['text_seconds']:.1f} s ({tm['records_per_second']:,} records/s, "
        f"{r['check']['workers']} workers){rate}"
    )
    res = r["result"]
    lines.append(
        ("PASSED" if res["passed"] else "FAILED") + f": {res['error_records']:,} records with errors "
        f"({100 * res['error_fraction']:.3g}%, threshold {100 * res['max_error_fraction']:.3g}%)"
    )
    lines += [f"  - {f}" for f in res["failures"]]
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "-"


def _histogram_lines(histogram: list[dict[str, int]], max_len: int, width: int = 40) -> list[str]:
    peak = max(b["samples"] for b in histogram) or 1
    lines = []
    for b in histogram:
        bar = "#" * round(width * b["samples"] / peak)
        note = "  truncated" if b["from"] > max_len else ""
        lines.append(f"  {b['from']:>7,}-{b['to']:<7,} {b['samples']:>10,} {bar}{note}")
    return lines
