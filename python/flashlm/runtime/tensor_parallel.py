"""Tensor-parallel serving: LLM(model, tensor_parallel_size=N) runs each step on N processes of this host.

    llm = LLM("model.gguf", tensor_parallel_size=2)   # the driver (this process) and one worker process

As vLLM lays it out: the driver, rank 0 in the user's process, holds the scheduler, the block manager and the
sampler; N - 1 worker processes (spawned, runtime/tp_worker.py) each load the model and keep their slice of
every layer (runtime/tp_shard.py) and their share of the paged KV cache: the same blocks and block tables as
one process would use, with this rank's K/V heads only. Each step the driver sends the step to the workers (a
small header through each worker's pipe, then one int64 tensor, broadcast over flashlm's shared-memory ring:
tokens, positions, cache slots, block tables, sequence lengths, query offsets and the block copies), and every
rank runs forward_paged of its slice, whose o and down projections all-reduce over the ring. Only the driver
computes the logits (the lm head is replicated on it, not split) and samples, so the tokens are the ones a
single process picks up to the float32 summation order of the all-reduces.

Workers are started with the "spawn" method and meet through the ring's shared memory alone (no sockets).
They end on close(), on the driver's exit (the pipe closes) and when a collective fails; a worker that dies
makes the driver's next collective raise RuntimeError naming it (the ring checks its peers' processes, and a
thread here reaps exited workers so that their ids go at once), never a hang. The native decoder stack is
single-process: tensor-parallel steps run module by module.
"""

import multiprocessing
import os
import secrets
import threading
import weakref
from multiprocessing.connection import wait

import torch

from flashlm.models.transformer import PagedBatch
from flashlm.ops import comm
from flashlm.parallel.mesh import Group
from flashlm.runtime.model_runner import ModelRunner
from flashlm.runtime.tp_shard import shard_for_serving

RING_TIMEOUT = 60.0  # seconds a rank waits for a peer inside a step (the ring raises, naming it, past that)
LOAD_TIMEOUT = 600.0  # seconds a worker may take to load the model


# ---- the step message --------------------------------------------------------------------------------------

def pack_step(tokens: torch.Tensor, paged: PagedBatch, copies) -> tuple:
    """(header, payload): header, a tuple of ints (tokens T, sequences S, block-table width B, whether
    cu_seqlens_q is there, max_seqlen_q, block copies C); payload int64 [T * 3 + S * B + S (+ S + 1) + 2 C]."""
    S, B = paged.block_table.shape
    parts = [tokens, paged.positions, paged.slot_mapping, paged.block_table.reshape(-1), paged.seq_lens]
    if paged.cu_seqlens_q is not None:
        parts.append(paged.cu_seqlens_q)
    parts.append(torch.tensor(copies, dtype=torch.int64).reshape(-1))
    header = (len(tokens), S, B, int(paged.cu_seqlens_q is not None), int(paged.max_seqlen_q), len(copies))
    return header, torch.cat([p.to(torch.int64) for p in parts])


def payload_size(header) -> int:
    T, S, B, with_cu, _, C = header
    return 3 * T + S * B + S + (S + 1) * with_cu + 2 * C


def unpack_step(header, payload: torch.Tensor, device) -> tuple:
    """(tokens, PagedBatch without logits rows, copies [(src, dst)]) of pack_step's message."""
    T, S, B, with_cu, max_seqlen_q, C = header
    sizes = [T, T, T, S * B, S, (S + 1) * with_cu, 2 * C]
    tokens, positions, slots, table, seq_lens, cu, copies = payload.split(sizes)
    paged = PagedBatch(positions=positions.to(device), slot_mapping=slots.to(device),
                       block_table=table.reshape(S, B).to(device, torch.int32),
                       seq_lens=seq_lens.to(device, torch.int32),
                       cu_seqlens_q=cu.to(device, torch.int32) if with_cu else None, max_seqlen_q=max_seqlen_q,
                       logits_rows=torch.empty(0, dtype=torch.int64, device=device))
    return tokens.to(device), paged, copies.reshape(C, 2).tolist()


# ---- the workers -------------------------------------------------------------------------------------------

class Workers:
    """The N - 1 worker processes of a tensor-parallel engine and the ring that joins them to the driver."""

    def __init__(self, size: int, source: str, load_kwargs: dict, num_blocks: int, block_size: int, kv_dtype):
        from flashlm.runtime import tp_worker  # its main is what each spawned process runs

        ctx = multiprocessing.get_context("spawn")
        job = f"tp-{os.getpid()}-{secrets.token_hex(6)}"
        self.procs, self.conns, self.group, self.error = [], [], None, None
        self._reapers = []
        # Ends the workers when this object goes (an engine dropped without close()) or at exit, at the latest.
        self._end = weakref.finalize(self, _end_processes, self.procs, self.conns, self._reapers)
        try:
            for rank in range(1, size):
                here, there = ctx.Pipe()
                p = ctx.Process(target=tp_worker.main, name=f"flashlm-tp-{rank}", daemon=True,
                                args=(there, job, rank, size, source, load_kwargs, num_blocks, block_size, kv_dtype,
                                      RING_TIMEOUT))
                p.start()
                there.close()  # the worker's end: the pipe then closes when the worker exits
                self.procs.append(p)
                self.conns.append(here)
            reaper = threading.Thread(target=_reap, args=(list(self.procs),), name="flashlm-tp-reaper", daemon=True)
            reaper.start()
            self._reapers.append(reaper)
            self._wait_ready()
            for conn in self.conns:
                conn.send(("connect",))
            self.group = Group("tp", tuple(range(size)), 0, comm.shm_ring(job, 0, size, timeout=RING_TIMEOUT))
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        waiting = dict(zip(self.conns, range(1, len(self.conns) + 1)))
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, 1)}
        while waiting:
            ready = wait([*waiting, *sentinels], timeout=LOAD_TIMEOUT)
            if not ready:
                raise RuntimeError(f"tensor_parallel_size: worker ranks {sorted(waiting.values())} did not load the "
                                   f"model within {LOAD_TIMEOUT:.0f} s")
            for conn in [c for c in ready if c in waiting]:
                rank = waiting.pop(conn)
                msg = self._receive(conn)
                if msg is None or msg[0] != "ready":
                    raise RuntimeError(f"tensor_parallel_size: worker rank {rank} could not start: "
                                       f"{self._why(rank, msg)}")
            for s in [s for s in ready if s in sentinels]:
                rank = sentinels.pop(s)
                if self.conns[rank - 1] in waiting:
                    raise RuntimeError(f"tensor_parallel_size: worker rank {rank} could not start: "
                                       f"{self._why(rank, None)}")

    @staticmethod
    def _receive(conn):
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None

    def _why(self, rank: int, msg) -> str:
        if msg is not None and msg[0] == "error":
            return msg[1]
        p = self.procs[rank - 1]
        p.join(timeout=1.0)
        return f"it exited with code {p.exitcode}" if p.exitcode is not None else "it stopped answering"

    def send_step(self, tokens, paged, copies) -> None:
        """Starts a step on every worker: the header through the pipes, the payload over the ring."""
        header, payload = pack_step(tokens, paged, copies)
        for conn in self.conns:
            conn.send(("step", header))
        self.group.broadcast(payload, 0)

    def failure(self, error: BaseException) -> RuntimeError:
        """The error a failed step raises (with what the workers said), after stopping every worker."""
        said = []
        for rank, conn in enumerate(self.conns, 1):
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] == "error":
                        said.append(f"worker rank {rank}: {msg[1]}")
            except (EOFError, OSError):
                pass
        self.close()
        said += [f"worker rank {r} exited with code {p.exitcode}" for r, p in enumerate(self.procs, 1)
                 if p.exitcode not in (None, 0)]
        self.error = f"a tensor-parallel step failed: {error}" + (f" ({'; '.join(said)})" if said else "")
        return RuntimeError(self.error)

    def close(self) -> None:
        """Ends every worker and drops the ring; idempotent. Steps after it raise RuntimeError."""
        self._end()
        if self.error is None:
            self.error = "the engine was closed"
        if self.group is not None:
            self.group.ring = None


def _reap(procs) -> None:
    """Joins each worker as it exits: a dead worker's process id then goes at once, and the ring, which checks
    whether its peers' processes still exist, fails the driver's collective instead of waiting."""
    pending = list(procs)
    while pending:
        done = wait([p.sentinel for p in pending])
        for p in [p for p in pending if p.sentinel in done]:
            p.join()
            pending.remove(p)


def _end_processes(procs, conns, reapers) -> None:
    """Asks each worker to close, then terminates and at last kills those still running, waiting for each."""
    for conn in conns:
        try:
            conn.send(("close",))
        except (OSError, ValueError):
            pass
    for join_timeout, stop in ((10.0, None), (5.0, "terminate"), (5.0, "kill")):
        if stop is not None:
            for p in procs:
                if p.is_alive():
                    getattr(p, stop)()
        if reapers:  # the reaper joins them
            reapers[0].join(timeout=join_timeout)
            if not reapers[0].is_alive():
                break
        else:
            for p in procs:
                p.join(timeout=join_timeout)
    for conn in conns:
        conn.close()
    conns.clear()


class TensorParallelRunner(ModelRunner):
    """The driver's ModelRunner: its model is rank 0's slice, and every forward runs on all ranks at once."""

    def __init__(self, model, size: int, source: str, load_kwargs: dict, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype = torch.float32, device="cpu"):
        self.workers = Workers(size, source, load_kwargs, num_blocks, block_size, kv_dtype)
        try:
            shard_for_serving(model, self.workers.group)
            super().__init__(model, num_blocks, block_size, kv_dtype, device, native_decoder=False)
        except BaseException:
            self.workers.close()
            raise
        self.size = size
        self._copies = []  # block copies made here since the last step, for the workers to make too

    def copy_blocks(self, copies) -> None:
        super().copy_blocks(copies)
        self._copies += copies

    def forward(self, tokens, paged: PagedBatch) -> torch.Tensor:
        if self.workers.error is not None:
            raise RuntimeError(f"the tensor-parallel workers have stopped ({self.workers.error})")
        try:
            self.workers.send_step(tokens, paged, self._copies)
            self._copies = []
            return super().forward(tokens, paged)
        except Exception as e:
            raise self.workers.failure(e) from e
        except BaseException as e:  # Ctrl-C mid-step: the ranks are out of step, so the workers end too
            self.workers.failure(e)
            raise

    def move_slots(self, src, dst) -> None:
        raise NotImplementedError("move_slots: not supported with tensor parallelism")

    def close(self) -> None:
        self.workers.close()
