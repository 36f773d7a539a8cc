"""One worker process of a tensor-parallel engine (runtime/tensor_parallel.py starts it with "spawn").

It loads the model as the driver did, keeps its rank's slice (runtime/tp_shard.py) and its share of the paged KV
cache, then serves the driver's messages until told to close or the driver goes away:

    ("connect",)          join the shared-memory ring
    ("step", header)      receive the step's tensor over the ring, copy blocks, run forward_paged (whose
                          all-reduces meet the other ranks'), keep no logits
    ("close",)            return

It answers ("ready",) once loaded, or ("error", text) when loading or a step fails (then it exits).
"""

import signal
import sys

import torch

from flashlm.ops import comm
from flashlm.parallel.mesh import Group
from flashlm.runtime.model_runner import ModelRunner
from flashlm.runtime.tensor_parallel import payload_size, unpack_step
from flashlm.runtime.tp_shard import shard_for_serving


def main(conn, job, rank, size, source, load_kwargs, num_blocks, block_size, kv_dtype, timeout) -> None:
    # Ctrl-C reaches the whole process group: the driver handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from flashlm.io import load_model

        model = load_model(source, **load_kwargs).model.eval()
    except Exception as e:
        _say(conn, ("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    _say(conn, ("ready",))
    try:
        _serve(conn, model, job, rank, size, num_blocks, block_size, kv_dtype, timeout)
    except Exception as e:
        _say(conn, ("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)


def _serve(conn, model, job, rank, size, num_blocks, block_size, kv_dtype, timeout) -> None:
    runner = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the driver has gone
            return
        if msg[0] == "close":
            return
        if msg[0] == "connect":
            group = Group("tp", tuple(range(size)), rank, comm.shm_ring(job, rank, size, timeout=timeout))
            shard_for_serving(model, group)
            runner = ModelRunner(model, num_blocks, block_size, kv_dtype, native_decoder=False)
        elif msg[0] == "step":
            header = msg[1]
            payload = group.broadcast(torch.empty(payload_size(header), dtype=torch.int64), 0)
            tokens, paged, copies = unpack_step(header, payload, runner.device)
            runner.copy_blocks(copies)
            model.forward_paged(tokens, paged, runner.kv_caches)
        else:
            raise ValueError(f"message: unknown kind {msg[0]!r}")


def _say(conn, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass
