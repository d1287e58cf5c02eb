"""Starting a server: the engine loop and the app over a loaded Engine, run by uvicorn in the foreground
(`monokernel serve`) or in a background thread (tests, embedding in a program)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from ..errors import InputError, MonokernelError
from ..runtime.scheduler import Scheduler
from .app import MAX_BODY_BYTES, create_app
from .loop import EngineLoop


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"          # loopback unless told otherwise, as vLLM and llama-server default to
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    queue_full_status: int = 429
    api_key: str | None = None
    model_name: str | None = None    # the id clients send as `model`; default: the model's own name
    max_body_bytes: int = MAX_BODY_BYTES
    prefill_chunk: int | None = None
    speculative: str | None = None   # "ngram" or "model:PATH": every request decodes speculatively (reference engine)
    draft_tokens: int = 4

    def __post_init__(self):
        for name in ("max_batch", "port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_batch" else 0):
                raise InputError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InputError(f"max_queue={self.max_queue!r} must be an integer >= 0")
        if self.queue_full_status not in (429, 503):
            raise InputError(f"queue_full_status={self.queue_full_status!r} must be 429 or 503")
        if self.speculative is not None:
            from ..speculative.run import check_speculative
            check_speculative(self.speculative, self.draft_tokens, "reference")   # the engine: once it is known


def build(engine, options: ServeOptions, *, wrap_decoder=None):
    """(app, loop) over `engine`; the loop's thread is started."""
    from .cli import speculative_hook

    hook = speculative_hook(engine, {"speculative": options.speculative, "draft_tokens": options.draft_tokens}
                            if options.speculative else {})
    sched = Scheduler(engine, options.max_batch, prefill_chunk_size=options.prefill_chunk, wrap_decoder=wrap_decoder,
                      speculative=hook)
    loop = EngineLoop(sched, options.max_queue).start()
    app = create_app(loop, model_name=options.model_name or engine.name, api_key=options.api_key,
                     queue_full_status=options.queue_full_status, max_body_bytes=options.max_body_bytes)
    return app, loop


def serve(engine, options: ServeOptions) -> None:
    """Runs until interrupted."""
    app, loop = build(engine, options)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        loop.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread on a free loopback port: `with ServerThread(engine) as srv: srv.url`."""

    def __init__(self, engine, options: ServeOptions | None = None, *, wrap_decoder=None):
        options = options or ServeOptions()
        if options.port == 0 or options.port == ServeOptions.port:
            options = ServeOptions(**{**options.__dict__, "port": free_port(options.host)})
        self.options = options
        self.app, self.loop = build(engine, options, wrap_decoder=wrap_decoder)
        config = uvicorn.Config(self.app, host=options.host, port=options.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="monokernel-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MonokernelError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.loop.stop()
