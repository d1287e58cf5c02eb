"""`monokernel serve`: the OpenAI-compatible server on 127.0.0.1 (add_arguments / run, as cli.py's plugins)."""
from __future__ import annotations

import sys

from ..cli import add_speculative_arguments
from ..errors import InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_model_arguments(p) -> None:
    from ..cli import _add_model_arguments

    _add_model_arguments(p)
    p.add_argument("--engine", default="auto", choices=("auto", "reference", "mega"))
    p.add_argument("--max-seq", type=int, default=None, help="KV-cache positions per slot (default: min(model "
                                                             "limit, 4096))")


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="slots decoded together (the compiled batch)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones are "
                                                             "refused")
    p.add_argument("--queue-full-status", type=int, default=429, choices=(429, 503),
                   help="HTTP status of a request refused because the queue is full")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt positions prefilled per engine step (bounds how long a prefill stalls decoding; "
                        "default 128 on CPU, 1024 on CUDA)")
    add_speculative_arguments(p)


def speculative_hook(engine, spec_kw: dict):
    """The Scheduler's speculative decode step for --speculative (None without), checked for the engine (the
    megakernel's verify step takes at most 7 draft tokens)."""
    if not spec_kw:
        return None
    from ..speculative.run import Speculation
    from ..speculative.scheduled import ScheduledSpeculation

    return ScheduledSpeculation(Speculation.create(spec_kw["speculative"], spec_kw["draft_tokens"], engine,
                                                   engine._drafters))


def run(args) -> int:
    from ..cli import speculative_arguments, weights_argument
    from ..runtime.engine import Engine
    from .server import ServeOptions, serve

    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                               ("--port", args.port, 0), ("--prefill-chunk", args.prefill_chunk or 1, 1)):
        if value < least:
            raise InputError(f"{flag} {value} must be >= {least}")
    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                           queue_full_status=args.queue_full_status, api_key=args.api_key,
                           model_name=args.served_model_name, prefill_chunk=args.prefill_chunk,
                           **speculative_arguments(args))
    if args.host not in LOOPBACK and args.api_key is None:
        print(f"monokernel: warning: serving on {args.host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr)
    print(f"monokernel: loading {args.model or 'the default model'}", file=sys.stderr, flush=True)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, engine=args.engine, max_seq=args.max_seq,
                         weights=weights_argument(args))
    name = options.model_name or engine.name
    if options.speculative:   # what the engine cannot do is refused before serving
        speculative_hook(engine, {"speculative": options.speculative, "draft_tokens": options.draft_tokens})
    print(f"monokernel: serving {name!r} ({engine.engine} engine, {args.max_batch} slots of {engine.max_seq} "
          f"positions) on http://{args.host}:{args.port}/v1 - Ctrl-C stops", file=sys.stderr, flush=True)
    serve(engine, options)
    return 0
