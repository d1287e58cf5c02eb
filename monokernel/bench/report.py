"""The benchmark's outputs: JSON (the record), a Markdown table (for BENCHMARKS.md) and a PNG plot.

JSON schema (fields beyond these are informative):
  {"device": str, "date": "YYYY-MM-DD", "command": str, "copy_bandwidth_TBps": float,
   "rows": [{"engine": "monokernel" | "torch-compile" | "hf" | "reference", "variant": str, "model": str,
             "dtype": str (activations), "weights": str (the dtype when dense, else the weight format),
             "batch": int, "context": int, "ms_per_step": float, "tokens_per_s": float, "bytes_per_step": int,
             "roofline_fraction": float, "speedup_vs_torch_compile": float | null, "agreement": {...}, ...}],
   "skipped": [{"engine", "variant", "model", "dtype", "batch", "context", "reason"}], "notices": [str], ...}
roofline_fraction = (bytes_per_step / copy bandwidth) / ms_per_step, with the copy bandwidth of the run
that produced the row (rows merged from several runs keep their own, in the row).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROW_FIELDS = ("engine", "model", "dtype", "batch", "context", "ms_per_step", "tokens_per_s", "bytes_per_step",
              "roofline_fraction", "speedup_vs_torch_compile")
TOP_FIELDS = ("device", "date", "command", "copy_bandwidth_TBps", "rows")
_KEY = ("engine", "variant", "model", "dtype", "weights", "batch", "context")


def gpu_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; 'cpu (x86_64)' -> 'cpu'."""
    if device.startswith("cpu"):
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return slug.removeprefix("nvidia-") or "gpu"


def merge(old: dict, new: dict) -> dict:
    """`new`'s rows replace `old`'s rows of the same engine/variant/model/dtype/batch/context; the rest stay.
    Each row keeps the copy bandwidth and speed-up of the run that measured it."""
    # rows written before the weights axis are dense: their weights are their dtype
    key = lambda r: tuple(r.get(k, r.get("dtype")) if k == "weights" else r.get(k) for k in _KEY)
    fresh = {key(r) for r in new["rows"] + new.get("skipped", [])}
    merged = dict(new)
    merged["rows"] = [r for r in old.get("rows", []) if key(r) not in fresh] + new["rows"]
    merged["skipped"] = [r for r in old.get("skipped", []) if key(r) not in fresh] + new.get("skipped", [])
    merged["command"] = " ; ".join(dict.fromkeys(c for c in (old.get("command", ""), new.get("command", "")) if c))
    merged["notices"] = list(dict.fromkeys(old.get("notices", []) + new.get("notices", [])))
    return merged


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _agreement_cell(a: dict | None) -> str:
    if not a or not a.get("steps"):
        return "–"
    if a.get("reference"):
        return "reference"
    ok = a["tokens"] - a["mismatches"]
    cell = f"{ok}/{a['tokens']}"
    if a["mismatches"]:
        cell += f" (gap ≤ {a['max_mismatch_logit_gap']:.3g})"
    return cell


def markdown(result: dict) -> str:
    lines = [f"**{result['device']}**, {result['date']}, copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s "
             f"(read + written); torch {result.get('torch')}, transformers {result.get('transformers')}",
             ""] + ([f"`{result['command']}`", ""] if result.get("command") else []) + [
             "| model | weights | batch | context | engine | variant | ms/step | tokens/s | MB/step | % roofline "
             "| × torch-compile | greedy agreement |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    order = {"torch-compile": 0, "monokernel": 1, "hf": 2}
    rows = sorted(result["rows"], key=lambda r: (r["model"], r["dtype"], r.get("weights", r["dtype"]), r["batch"],
                                                 r["context"], order.get(r["engine"], 9), r.get("variant", "")))
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('weights', r['dtype'])} | {r['batch']} | {r['context']} | {r['engine']} "
                     f"| {r.get('variant', '')} "
                     f"| {r['ms_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['bytes_per_step'] / 1e6:.4g} "
                     f"| {100 * r['roofline_fraction']:.1f} | {_fmt(r['speedup_vs_torch_compile'], '.2f')} "
                     f"| {_agreement_cell(r.get('agreement'))} |")
    if result.get("skipped"):
        lines += ["", "Skipped:", "", "| model | weights | batch | context | engine | reason |",
                  "|---|---|---:|---:|---|---|"]
        for r in result["skipped"]:
            reason = r["reason"].replace("|", "\\|")
            lines.append(f"| {r['model']} | {r.get('weights', r['dtype'])} | {r['batch']} | {r['context']} "
                         f"| {r['engine']} ({r.get('variant', '')}) "
                         f"| {reason} |")
    if result.get("notices"):
        lines += [""] + [f"- {n}" for n in result["notices"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """ms/step against context, one panel per model x batch, one line per engine variant, the roofline
    dashed. Returns False (nothing written) when matplotlib is missing or there are no rows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    if not rows:
        return False
    models = sorted({(r["model"], r.get("weights", r["dtype"])) for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(models), len(batches), figsize=(4.2 * len(batches), 3.4 * len(models)),
                             squeeze=False)
    for i, (model, dtype) in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            sel = [r for r in rows if (r["model"], r.get("weights", r["dtype"]), r["batch"]) == (model, dtype, batch)]
            if not sel:          # a combination the run did not measure
                ax.set_axis_off()
                continue
            for label in sorted({f"{r['engine']} ({r.get('variant', '')})" for r in sel}):
                pts = sorted((r["context"], r["ms_per_step"]) for r in sel
                             if f"{r['engine']} ({r.get('variant', '')})" == label)
                ax.plot(*zip(*pts), marker="o", label=label)
            roof = sorted({(r["context"], r["roofline_ms"]) for r in sel if "roofline_ms" in r})
            if roof:
                # a marker too: a panel with one context has no line to draw
                ax.plot(*zip(*roof), "k--", marker="_", markersize=14, label="roofline (copy bandwidth)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model} {dtype}, batch {batch}", fontsize=9)
            ax.set_xlabel("context (cached positions)")
            ax.set_ylabel("ms / step")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"{result['device']}, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def output_paths(out_dir: Path, result: dict, append: bool) -> dict[str, Path]:
    """<out>/<date>-<gpu>.{json,md,png}; without `append`, an existing file gets a -2, -3, ... sibling."""
    out_dir = Path(out_dir)
    stem = f"{result['date']}-{gpu_slug(result['device'])}"
    n = 1
    while not append and (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{result['date']}-{gpu_slug(result['device'])}-{n}"
    return {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def write_reports(result: dict, paths: dict[str, Path], with_plot: bool = True) -> dict[str, Path]:
    """Writes JSON and Markdown (and the plot, unless with_plot is False), replacing files in one step."""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(paths["json"], json.dumps(result, indent=1) + "\n")
    _atomic_write(paths["md"], markdown(result))
    written = {"json": paths["json"], "md": paths["md"]}
    if with_plot and plot(result, paths["png"]):
        written["png"] = paths["png"]
    return written


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
