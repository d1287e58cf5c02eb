"""The engine thread: the one owner of the Scheduler (which is not thread safe).

Other threads hand it work through a queue of commands (submit, abort, call) and get events back through
the per-request sink they submitted with; the HTTP side's sink puts them on an asyncio queue. A command is
taken before every step, so an abort frees its slot before the next step runs.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Callable

from ..errors import MonokernelError
from ..runtime.requests import Request, RequestEvent
from ..runtime.scheduler import Scheduler
from .metrics import Metrics

Sink = Callable[[RequestEvent], None]


class QueueFull(MonokernelError):
    """Every slot is taken and the waiting queue holds --max-queue requests."""


class EngineLoop:
    def __init__(self, scheduler: Scheduler, max_queue: int = 64):
        self.scheduler, self.max_queue = scheduler, max_queue
        self.metrics = Metrics(scheduler)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}            # engine thread only
        self._last_token: dict[str, float] = {}      # engine thread only: arrival, then the last token's time
        self._first: set[str] = set()                # engine thread only: no token yet
        self._outstanding = 0                        # submitted and not yet finished or aborted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monokernel-engine", daemon=True)

    @property
    def capacity(self) -> int:
        return self.scheduler.batch + self.max_queue

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    # ---- Any thread -------------------------------------------------------------------------------
    def submit(self, request: Request, sink: Sink) -> None:
        with self._lock:
            if self._outstanding >= self.capacity:
                raise QueueFull(f"the server is full: {self.scheduler.batch} requests running and {self.max_queue} "
                                "waiting (--max-batch, --max-queue); retry later")
            self._outstanding += 1
        self._inbox.put(("submit", request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[Scheduler], object]) -> Future:
        """Runs fn(scheduler) on the engine thread between steps (stats, test hooks)."""
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # ---- The engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.scheduler.has_work)
            if self.scheduler.has_work:
                self._step()

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._command(cmd)
                cmd = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "submit":
            _, request, sink = cmd
            try:
                self.scheduler.submit(request)
            except MonokernelError as e:
                self._finish_sink(request.id, sink, RequestEvent(request.id, None, "", "error", error=e))
                return
            self._sinks[request.id] = sink
            self._last_token[request.id] = request.arrival
            self._first.add(request.id)
            self.metrics.prompt.inc(len(request.prompt_ids))
        elif kind == "abort":
            if self.scheduler.abort(cmd[1]):
                self._drop(cmd[1])
                self.metrics.requests.labels("abort").inc()
        elif kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.scheduler))
            except Exception as e:   # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _step(self) -> None:
        t0 = time.perf_counter()
        before = self.scheduler.stats.prefill_tokens
        try:
            events = self.scheduler.step()
        except Exception as e:   # noqa: BLE001 - the scheduler failed outside a step's own guard: start over
            traceback.print_exc(file=sys.stderr)
            events = [RequestEvent(rid, None, "", "error", error=e) for rid in list(self._sinks)]
            for rid in list(self.scheduler.live):
                self.scheduler.abort(rid)
            try:
                self.scheduler.reset()
            except Exception:   # noqa: BLE001 - e.g. no memory for a new cache: the next step tries again
                traceback.print_exc(file=sys.stderr)
        now = time.perf_counter()
        self.metrics.step.observe(now - t0)
        self.metrics.prefilled.inc(self.scheduler.stats.prefill_tokens - before)
        for ev in events:
            sink = self._sinks.get(ev.request_id)
            if sink is None:
                continue
            if ev.token_id is not None:
                self.metrics.generated.inc()
                last = self._last_token.get(ev.request_id, now)
                if ev.request_id in self._first:
                    self._first.discard(ev.request_id)
                    self.metrics.ttft.observe(now - last)
                else:
                    self.metrics.itl.observe(now - last)
                self._last_token[ev.request_id] = now
            if ev.finished:
                self.metrics.requests.labels(ev.finish_reason).inc()
                self._drop(ev.request_id)
            _deliver(sink, ev)

    def _drop(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._last_token.pop(request_id, None)
        self._first.discard(request_id)
        with self._lock:
            self._outstanding -= 1

    def _finish_sink(self, request_id: str, sink: Sink, ev: RequestEvent) -> None:
        with self._lock:
            self._outstanding -= 1
        _deliver(sink, ev)


def _deliver(sink: Sink, ev: RequestEvent) -> None:
    try:
        sink(ev)
    except Exception:   # noqa: BLE001 - a consumer gone (its event loop closed) must not stop the engine
        pass
