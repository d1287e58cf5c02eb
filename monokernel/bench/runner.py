"""`run_benchmark`: every model x batch x context x engine, in one process, on the same inputs.

For each model the weights are built once (seeded random weights for a ModelSpec; a model argument goes
through models.load: a preset gets seeded random weights, a path is read). For each (batch, context)
every engine in turn:
  1. builds its decoder with a cache of max_seq = context + agreement + warm-up + timed steps positions
     (rounded up to 64): static-cache baselines attend over all of it, as gpt-fast and transformers do;
  2. gets positions 0..context-1 of its cache filled with the same seeded random K/V (fill_random_kv);
  3. decodes `agreement_steps` checked steps (Decoder.step) at positions context.. with the same forced
     random tokens; the greedy tokens and logits are compared with the reference engine's (torch-compile
     when it runs, else the first engine): mismatches are reported, never fatal. These steps also compile
     and capture graphs;
  4. enqueues `warmup` steps, then `steps` timed steps, one position further each step (a plain decode),
     then checks the decoder for errors.
Only one engine exists at a time; GPU memory is released between engines and models. A row that cannot
run (engine unavailable, out of memory, context beyond the model) is recorded as skipped with the reason.

The `weights` axis (`--weights bf16,int8,int4,fp8`) loads each model once per weight format: "dense" (or the
dtype's name) as stored, a --quantize format as its round-to-nearest twin. A row's bytes per step are those of
the weights as loaded (PackedWeights.bytes_per_step: packed codes, scales and zeros exactly). Quantised rows run
on the reference engine (weights kept packed), on the gpt-fast-style torch.compile baselines where they have a
path, and int8 on the megakernel; the others say why they do not yet.
"""
from __future__ import annotations

import datetime
import gc
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InsufficientMemory, MonokernelError
from ..models.formats import format_name
from ..models.load import load_model, load_spec
from ..models.spec import ModelSpec
from ..models.weights import PackedWeights, random_weights
from ..runtime.memory import GB, available_bytes, check_fits, device_label, estimate_memory, workspace_bytes
from . import roofline
from .bandwidth import copy_bandwidth_TBps
from .engines import ENGINES, build_engine, fill_random_kv, monokernel_import_error
from .timing import MIN_STEPS, time_steps

MAX_SEQ_ALIGN = 64


@dataclass
class BenchConfig:
    models: list[str | ModelSpec]                 # "preset:NAME", a checkpoint path, or a ModelSpec (random weights)
    engines: list[str] = field(default_factory=lambda: ["monokernel", "torch-compile", "hf"])
    batches: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192, 32768])
    # rows a sequence scores in one launch: 1 decodes; T > 1 is the megakernel's verify step (speculative
    # decoding: the last token and T - 1 draft tokens), the other engines' rows left out
    tokens_per_seq: list[int] = field(default_factory=lambda: [1])
    # temperatures of the megakernel's timed steps: 0 greedy; T > 0 draws every row in the kernel (Gumbel-max,
    # monokernel/gumbel.py), the other engines' rows left out
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    top_k: int | None = None          # the sampled rows' top-k (drawn in the kernel up to gumbel.TOP_CANDIDATES)
    dtype: torch.dtype = torch.bfloat16
    weights: list[str] = field(default_factory=lambda: ["dense"])   # "dense" or --quantize formats
    steps: int = 100
    warmup: int = 20
    agreement_steps: int = 16
    device: str | None = None
    seed: int = 0
    compile: bool = True                          # False: torch-compile and hf-compile run eagerly (CPU tests)
    tc_attention: str = "math"
    bandwidth_bytes: int = 1 << 30
    progress: bool = True
    command: str = ""


@dataclass
class _Model:
    name: str
    spec: ModelSpec
    weights: PackedWeights | None
    error: str | None = None
    weights_name: str = ""      # the row's "weights" column: the dtype's name when dense, else the format


def weights_format(name: str):
    """A --weights entry: None for dense ("dense" or a dtype name), else the --quantize format."""
    from ..models.formats import FORMATS, quantize_format

    if name == "dense" or (name in FORMATS and not FORMATS[name].quantised):
        return None
    return quantize_format(name)


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _device(cfg: BenchConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _free_memory(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()   # compiled graphs and their CUDA-graph pools hold the engine's tensors
    except Exception:
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load_model(source: str | ModelSpec, dtype: torch.dtype, device: torch.device, seed: int,
                weights: str = "dense") -> _Model:
    fmt = weights_format(weights)
    label = format_name(dtype) if fmt is None else fmt.name
    if isinstance(source, ModelSpec):
        w = random_weights(source, dtype, device, seed) if fmt is None else random_weights(source, dtype, device, seed, fmt)
        return _Model(source.name, source, w, weights_name=label)
    loaded = load_model(source, dtype=dtype, device=device, seed=seed, weights=None if fmt is None else fmt.name)
    if fmt is None and loaded.weights.quantised:      # a GGUF kept packed: name what it is
        label = "/".join(sorted({n for v in loaded.weights.formats().values() for n in v}))
    return _Model(loaded.name, loaded.spec, loaded.weights, weights_name=label)


def _check_model_fits(source: str | ModelSpec, cfg: BenchConfig, device: torch.device, weights: str = "dense") -> None:
    """InsufficientMemory when the weights and the smallest row cannot fit (the other rows are checked one by one)."""
    spec = source if isinstance(source, ModelSpec) else load_spec(source)
    max_seq = min(_max_seq(cfg, min(cfg.contexts)), spec.max_position_embeddings)
    fmt = weights_format(weights)
    check_fits(estimate_memory(spec, cfg.dtype, min(cfg.batches), max_seq, device, step_positions=1,
                               **({} if fmt is None else {"weights": fmt})), device,
               spec.name if isinstance(source, ModelSpec) else source, max_seq_limit=spec.max_position_embeddings)


def _max_seq(cfg: BenchConfig, context: int) -> int:
    need = context + cfg.agreement_steps + cfg.warmup + cfg.steps
    return -(-need // MAX_SEQ_ALIGN) * MAX_SEQ_ALIGN


def _reason(e: BaseException) -> str:
    if isinstance(e, InsufficientMemory):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory: " + str(e).splitlines()[0][:200]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _agreement(ref: dict | None, greedy: torch.Tensor, logits: torch.Tensor) -> dict:
    """Greedy tokens (n, B) and logits (n, B, V) of one engine against the reference engine's."""
    out = {"steps": int(greedy.shape[0]), "tokens": int(greedy.numel()),
           "argmax_inconsistent": int((logits.argmax(-1) != greedy).sum())}
    if ref is None:
        out["reference"] = True
        return out
    rl, rg = ref["logits"], ref["greedy"]
    mism = greedy != rg
    out.update(reference=False, reference_engine=ref["label"], mismatches=int(mism.sum()),
               first_mismatch_step=int(mism.any(-1).nonzero()[0, 0]) if mism.any() else None,
               max_rel_logit_diff=float((logits - rl).abs().amax() / rl.abs().amax().clamp_min(1e-30)))
    if mism.any():
        # How far apart the two chosen tokens are in the reference's own logits: ~0 is a near tie.
        gap = rl.gather(-1, rg[..., None]) - rl.gather(-1, greedy[..., None])
        out["max_mismatch_logit_gap"] = float(gap[..., 0][mism].max())
    return out


def run_benchmark(cfg: BenchConfig, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Runs the grid; returns the result dict (report.py's schema). `checkpoint(result)` is called after
    every engine row so a run cut short still leaves its rows behind."""
    from tqdm import tqdm

    for e in cfg.engines:
        if e not in ENGINES:
            raise MonokernelError(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")
    if cfg.steps < MIN_STEPS:
        _log(f"bench: note: {cfg.steps} timed steps (< {MIN_STEPS}); fine for a smoke test, not for a report")
    device = _device(cfg)
    dtype_name = format_name(cfg.dtype)
    # torch-compile first: it is the agreement reference and the speed-up's denominator.
    engines = sorted(dict.fromkeys(cfg.engines), key=lambda e: e != "torch-compile")
    notices: list[str] = []
    unavailable: dict[str, str] = {}
    if "monokernel" in engines and (reason := monokernel_import_error() or
                                    (None if device.type == "cuda" else "the megakernel needs a CUDA device")):
        unavailable["monokernel"] = reason
        notices.append(f"monokernel rows skipped: {reason}")
        _log(f"bench: {notices[-1]}")

    # CPU runs are smoke tests: a 64 MiB copy is enough there and keeps them quick.
    nbytes = cfg.bandwidth_bytes if device.type == "cuda" else min(cfg.bandwidth_bytes, 1 << 26)
    bandwidth = copy_bandwidth_TBps(device, nbytes)
    _log(f"bench: {device_name(device)}: copy bandwidth {bandwidth:.2f} TB/s (read + written)")
    result = {
        "device": device_name(device), "date": datetime.date.today().isoformat(), "command": cfg.command,
        "copy_bandwidth_TBps": bandwidth, "rows": [], "skipped": [], "notices": notices,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": _version("transformers"),
        "python": platform.python_version(),
        "settings": {"steps": cfg.steps, "warmup": cfg.warmup, "agreement_steps": cfg.agreement_steps,
                     "seed": cfg.seed, "compile": cfg.compile, "torch_compile_attention": cfg.tc_attention,
                     "max_seq_align": MAX_SEQ_ALIGN, "kv_fill": "seeded N(0,1) random K/V"},
    }

    per_cell = len(engines) + ("monokernel" in engines) * (len(cfg.tokens_per_seq) * len(cfg.temperatures) - 1)
    total = len(cfg.models) * len(cfg.weights) * len(cfg.batches) * len(cfg.contexts) * per_cell
    # disable=None: no bar when stderr is not a terminal (a captured log keeps the per-row lines only)
    bar = tqdm(total=total, desc="bench", unit="row", disable=None if cfg.progress else True, file=sys.stderr)
    for source, weights in ((s, w) for s in cfg.models for w in cfg.weights):
        label = source.name if isinstance(source, ModelSpec) else source
        wlabel = format_name(cfg.dtype) if weights_format(weights) is None else weights_format(weights).name
        bar.set_postfix_str(f"loading {label}")
        try:
            # estimated before loading: on the CPU a model too big is not an exception but the OOM killer
            _check_model_fits(source, cfg, device, weights)
            model = _load_model(source, cfg.dtype, device, cfg.seed, weights)
        except Exception as e:   # a missing checkpoint, out of memory: the model's rows are skipped
            reason = _reason(e)
            _log(f"bench: model {label} ({wlabel}) skipped: {reason}")
            for b in cfg.batches:
                for c in cfg.contexts:
                    for e_ in engines:
                        result["skipped"].append(_skip_row(e_, label, dtype_name, b, c, reason, weights=wlabel))
            bar.update(len(cfg.batches) * len(cfg.contexts) * len(engines))
            _free_memory(device)
            continue
        for batch, t, temp in ((b, t, x) for b in cfg.batches for t in cfg.tokens_per_seq for x in cfg.temperatures):
            for context in cfg.contexts:
                ref = None
                for name in (engines if t == 1 and temp == 0 else [e for e in engines if e == "monokernel"]):
                    bar.set_postfix_str(f"{model.name} {model.weights_name} b={batch} ctx={context} {name}")
                    row, ref_out = _run_row(cfg, model, name, batch, context, device, bandwidth, ref, unavailable, t,
                                            temp)
                    if ref_out is not None and ref is None:
                        ref = ref_out
                    (result["rows"] if "reason" not in row else result["skipped"]).append(row)
                    where = (f"{model.name} {model.weights_name} b={batch} ctx={context} {name}" + (f" T={t}" if t > 1 else "")
                             + (f" temperature {temp:g}" if temp else ""))
                    if "reason" in row:
                        _log(f"bench: {where}: skipped: {row['reason']}")
                    else:
                        _log(f"bench: {where}: {row['ms_per_step']:.3f} ms/step, "
                             f"{100 * row['roofline_fraction']:.1f}% of roofline, setup {row['setup_s']:.1f} s"
                             + _agreement_note(row["agreement"]))
                    _fill_speedups(result["rows"])
                    bar.update(1)
                    if checkpoint is not None:
                        checkpoint(result)
                del ref
        model.weights = None
        del model
        _free_memory(device)
    bar.close()
    _fill_speedups(result["rows"])
    return result


def _agreement_note(a: dict) -> str:
    if a.get("reference") or not a.get("steps"):
        return ""
    return f", greedy agreement {a['tokens'] - a['mismatches']}/{a['tokens']} vs {a['reference_engine']}"


_DEFAULT_VARIANT = {"monokernel": "megakernel", "torch-compile": "reduce-overhead", "hf": "eager",
                    "hf-compile": "compiled", "reference": "eager"}


def _skip_row(engine: str, model: str, dtype: str, batch: int, context: int, reason: str, variant: str = "",
              weights: str | None = None) -> dict:
    return {"engine": "hf" if engine == "hf-compile" else engine, "variant": variant or _DEFAULT_VARIANT[engine],
            "model": model, "dtype": dtype, "weights": weights or dtype, "batch": batch, "context": context,
            "reason": reason}


def _run_row(cfg, model: _Model, name: str, batch: int, context: int, device, bandwidth: float,
             ref: dict | None, unavailable: dict[str, str], t: int = 1, temp: float = 0.0) -> tuple[dict, dict | None]:
    """One engine at one (batch, context): the result row (or a skipped row) and, for the reference
    engine, its agreement outputs. t > 1: the megakernel's verify step of t consecutive positions of each
    sequence a launch, the window one position further each step (as a pass that accepts nothing), its
    agreement left to tests/runtime/test_verify_gpu.py, and the bytes it must read those of a decode step
    (the weights, and each sequence's keys once). temp > 0: the timed steps draw every row in the kernel at that
    temperature (seeded), after the greedy agreement steps."""
    spec, dtype = model.spec, cfg.dtype
    dtype_name = format_name(dtype)
    skip = lambda reason: (_skip_row(name, model.name, dtype_name, batch, context, reason,
                                     variant=_mega_variant(t, temp, cfg.top_k) if (t > 1 or temp) else "",
                                     weights=model.weights_name or None), None)
    if name in unavailable:
        return skip(unavailable[name])
    max_seq = _max_seq(cfg, context + t - 1)
    if max_seq > spec.max_position_embeddings:
        return skip(f"context {context} + {max_seq - context} decode positions exceed the model's "
                    f"{spec.max_position_embeddings} positions")
    per_pos = spec.kv_bytes_per_position(dtype) * batch
    kv_bytes = per_pos * max_seq
    fill_bytes = per_pos * context // spec.num_layers     # one layer's random K/V while filling
    free = available_bytes(device)
    workspace = workspace_bytes(spec, batch, max_seq, device.type, step_positions=1, loading=False)
    if free is not None and kv_bytes + fill_bytes + workspace > free:
        return skip(f"needs {(kv_bytes + fill_bytes + workspace) / GB:.1f} GB (KV cache {kv_bytes / GB:.1f} GB for "
                    f"{batch} x {max_seq} positions, workspace {(fill_bytes + workspace) / GB:.1f} GB) but "
                    f"{device_label(device)} has {free / GB:.1f} GB free")

    engine = None
    try:
        t0 = time.perf_counter()
        engine = build_engine(name, model.weights, batch, max_seq, compile=cfg.compile, attention=cfg.tc_attention,
                              tokens_per_seq=t)
        decoder = engine.decoder
        fill_random_kv(decoder, spec, batch, context, dtype, device, cfg.seed + 1)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        n_agree = cfg.agreement_steps if t == 1 else 0
        forced = torch.randint(0, spec.vocab_size, (n_agree, batch), generator=gen).to(device)
        # One (B x t,) tensor per step, built up front: a step then launches nothing to make its inputs.
        window = torch.arange(t, device=device).repeat(batch)
        positions = [window + p for p in range(context, context + n_agree + cfg.warmup + cfg.steps)]
        greedy, logits = [], []
        for j in range(n_agree):
            g, lg = decoder.step(forced[j], positions[j])
            greedy.append(g.long().cpu())
            logits.append(lg.float().cpu())
        setup_s = time.perf_counter() - t0
        variant, identity = engine.variant, engine.identity
        label = f"{engine.engine} ({variant})"
        agreement, ref_out = {"steps": 0}, None
        if n_agree:
            greedy, logits = torch.stack(greedy), torch.stack(logits)            # (n, B), (n, B, V)
            agreement = _agreement(ref, greedy, logits)
            if ref is None:
                ref_out = {"label": label, "greedy": greedy, "logits": logits}

        tokens = torch.randint(0, spec.vocab_size, (batch * t,), generator=gen).to(device)
        first = context + n_agree
        if temp:
            decoder.set_sampling([temp] * (batch * t), list(range(cfg.seed, cfg.seed + batch * t)),
                                 [cfg.top_k] * (batch * t))
            variant = _mega_variant(t, temp, cfg.top_k)

        def step(i: int):
            decoder.enqueue(tokens, positions[n_agree + i])

        timing = time_steps(step, cfg.steps, cfg.warmup, device)
        decoder.check()
    except Exception as e:
        # Out of memory, a compiler failure, an unsupported shape: the row is skipped and the run goes
        # on (a sticky CUDA error will then fail every later row the same way, each with its reason).
        row = skip(_reason(e))[0]
        if engine is not None:
            row["variant"] = engine.variant
        return row, None
    finally:
        engine = decoder = None   # the timed closure shares these variables: the decoder is released here
        _free_memory(device)

    # Timed step i sits at position first + warmup + i: its cache holds that many positions.
    mean_positions = first + cfg.warmup + (cfg.steps - 1) / 2
    nbytes = roofline.bytes_per_step(spec, batch, round(mean_positions), dtype,
                                     weight_bytes=model.weights.bytes_per_step() if model.weights is not None else None)
    ms = timing.median_ms
    row = {"engine": "hf" if name == "hf-compile" else name, "variant": variant,
           "model": model.name, "dtype": dtype_name, "weights": model.weights_name or dtype_name,
           "batch": batch, "context": context, "tokens_per_seq": t, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "bytes_per_step": nbytes,
           "roofline_fraction": roofline.roofline_fraction(nbytes, bandwidth, ms),
           "speedup_vs_torch_compile": None,
           "roofline_ms": roofline.roofline_ms(nbytes, bandwidth), "copy_bandwidth_TBps": bandwidth,
           "ms_per_step_mean": timing.mean_ms, "ms_per_step_min": timing.min_ms, "ms_per_step_max": timing.max_ms,
           "steps": timing.steps, "warmup": cfg.warmup, "clock": timing.clock, "max_seq": max_seq,
           "kv_positions_read": mean_positions, "setup_s": setup_s, "agreement": agreement, **identity}
    return row, ref_out


def _mega_variant(t: int, temp: float, top_k: int | None = None) -> str:
    sampled = f", sampled at temperature {temp:g}" + (f", top-k {top_k}" if top_k else "") if temp else ""
    return "megakernel" + (f", verify T={t}" if t > 1 else "") + sampled


def _fill_speedups(rows: list[dict]) -> None:
    key = lambda r: (r["model"], r["dtype"], r.get("weights", r["dtype"]), r["batch"], r["context"],
                     r.get("tokens_per_seq", 1))
    base = {key(r): r["ms_per_step"] for r in rows if r["engine"] == "torch-compile"}
    for r in rows:
        b = base.get(key(r))
        r["speedup_vs_torch_compile"] = None if b is None else b / r["ms_per_step"]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None
