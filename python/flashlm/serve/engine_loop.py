"""EngineLoop: one thread that owns the LLM (which is not thread-safe) and steps it while requests come and go.

Requests and aborts reach the thread through a queue and join at its next step, so a new request never waits
for the running batch to finish. Each request's outputs go back to the asyncio queue of the handler that
submitted it (loop.call_soon_threadsafe); the last one has finished=True. A handler whose client went away
calls abort(), which frees the request's KV blocks before the next step.

    loop = EngineLoop(llm, metrics); loop.start()
    outputs = asyncio.Queue()
    rid = await loop.submit(prompt_ids, params, outputs)   # ValueError/TypeError from add_request, raised here
    out = await outputs.get()        # a RequestOutput (cumulative, as LLM.step returns it) or an EngineError
"""

import asyncio
import concurrent.futures
import queue
import threading
import time


class EngineError(RuntimeError):
    """The engine failed in a step: every request then running ends with this."""

    def __init__(self, message: str, request_id: int):
        super().__init__(message)
        self.request_id = request_id


class _Tracked:
    """What the loop keeps per request: where its outputs go and its token timings for the metrics."""
    __slots__ = ("loop", "outputs", "arrival", "last_time", "num_tokens", "total_tokens")

    def __init__(self, loop, outputs):
        self.loop, self.outputs = loop, outputs
        self.arrival = time.perf_counter()
        self.last_time = None
        self.num_tokens = 0  # of the longest sample: the request's position in time
        self.total_tokens = 0  # of all samples


class EngineLoop:
    def __init__(self, llm, metrics=None):
        self.llm = llm
        self.metrics = metrics
        self._inbox = queue.SimpleQueue()
        self._tracked = {}  # request_id -> _Tracked, touched by the engine thread alone
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="flashlm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    async def submit(self, prompt_ids: list, params, outputs: asyncio.Queue) -> int:
        """Queues a request for the next step; returns its request id. Its outputs, and an EngineError if the
        engine fails, go to `outputs` (several requests may share one queue: each output names its request).
        add_request's ValueError/TypeError (bad parameters, a prompt that can never fit) is raised here."""
        added = concurrent.futures.Future()
        self._inbox.put(("add", prompt_ids, params, asyncio.get_running_loop(), outputs, added))
        return await asyncio.wrap_future(added)

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn):
        """Runs fn(llm) on the engine thread between steps; a concurrent Future of its result (for the tests'
        and metrics' reads of engine state)."""
        done = concurrent.futures.Future()
        self._inbox.put(("call", fn, done))
        return done

    # ---- the engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            # Idle: sleep until a command comes. Busy: take what has come and step.
            block = not self.llm.has_unfinished_requests()
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopping or not self.llm.has_unfinished_requests():
                self._observe_state()
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # a bug in the engine: end every request rather than hang its client
                self._fail_all(e)
                continue
            self._deliver(outputs)
            self._observe_state()

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, prompt_ids, params, loop, outputs, added = command
            try:
                request_id = self.llm.add_request(prompt_ids, params)
            except Exception as e:  # ValueError/TypeError: the handler turns them into 400s
                added.set_exception(e)
                return
            self._tracked[request_id] = _Tracked(loop, outputs)
            added.set_result(request_id)
            if self.metrics is not None:
                self.metrics.requests_total.inc()
        elif kind == "abort":
            if self._tracked.pop(command[1], None) is not None:
                self.llm.abort_request(command[1])
                if self.metrics is not None:
                    self.metrics.requests_aborted.inc()
        elif kind == "call":
            _, fn, done = command
            try:
                done.set_result(fn(self.llm))
            except Exception as e:
                done.set_exception(e)

    def _deliver(self, outputs: list) -> None:
        now = time.perf_counter()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._observe_tokens(tracked, out, now)
            if out.finished:
                del self._tracked[out.request_id]
            tracked.loop.call_soon_threadsafe(tracked.outputs.put_nowait, out)

    def _observe_tokens(self, tracked: _Tracked, out, now: float) -> None:
        n = max((len(c.token_ids) for c in out.outputs), default=0)
        new = n - tracked.num_tokens
        if self.metrics is None or new <= 0:
            return
        total = sum(len(c.token_ids) for c in out.outputs)
        self.metrics.generation_tokens.inc(total - tracked.total_tokens)
        if tracked.last_time is None:
            self.metrics.time_to_first_token.observe(now - tracked.arrival)
        else:  # a step that brought k tokens (speculative decoding) counts k intervals of its time / k
            for _ in range(new):
                self.metrics.inter_token_latency.observe((now - tracked.last_time) / new)
        tracked.last_time, tracked.num_tokens, tracked.total_tokens = now, n, total

    def _observe_state(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_engine(self.llm)

    def _fail_all(self, e: Exception) -> None:
        message = f"the engine failed: {type(e).__name__}: {e}"
        for request_id, tracked in list(self._tracked.items()):
            self.llm.abort_request(request_id)
            tracked.loop.call_soon_threadsafe(tracked.outputs.put_nowait, EngineError(message, request_id))
        self._tracked.clear()
