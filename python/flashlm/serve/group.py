"""RequestGroup: the engine requests behind one HTTP request (one per prompt), read as one stream of outputs,
and aborted the moment the client goes away.

    group = RequestGroup(engine_loop, request)
    await group.add(prompt_ids, params)            # per prompt; add_request's errors raised here
    async for index, out in group.outputs(): ...   # (prompt index, cumulative RequestOutput)

Leaving the loop early (the client disconnected, the handler was cancelled, an error) aborts every request
of the group that has not finished, so its KV blocks are freed before the engine's next step.
"""

import asyncio

_DISCONNECTED = object()


async def _wait_for_disconnect(receive, outputs: asyncio.Queue) -> None:
    # The body has been read, so the server's next message is the client leaving (ASGI http.disconnect).
    while (await receive())["type"] != "http.disconnect":
        pass
    outputs.put_nowait(_DISCONNECTED)


class RequestGroup:
    def __init__(self, engine_loop, request):
        self.engine_loop = engine_loop
        self.request = request
        self.request_ids = []  # in prompt order
        self._unfinished = set()
        self._outputs = asyncio.Queue()
        self.client_gone = False

    async def add(self, prompt_ids: list, params) -> None:
        try:
            request_id = await self.engine_loop.submit(prompt_ids, params, self._outputs)
        except BaseException:
            self.abort()
            raise
        self.request_ids.append(request_id)
        self._unfinished.add(request_id)

    async def outputs(self):
        index = {rid: i for i, rid in enumerate(self.request_ids)}
        watcher = asyncio.ensure_future(_wait_for_disconnect(self.request.receive, self._outputs))
        try:
            while self._unfinished:
                out = await self._outputs.get()
                if out is _DISCONNECTED:
                    self.client_gone = True
                    return
                if isinstance(out, BaseException):  # EngineError: the engine failed in a step
                    self._unfinished.discard(out.request_id)
                    raise out
                if out.finished:
                    self._unfinished.discard(out.request_id)
                yield index[out.request_id], out
        finally:
            watcher.cancel()
            self.abort()

    def abort(self) -> None:
        """Ends the requests that have not finished."""
        for rid in self._unfinished:
            self.engine_loop.abort(rid)
        self._unfinished.clear()
