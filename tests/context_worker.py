"""One rank of the multi-process ring attention test (tests/test_parallel_context.py starts N of these).

    python context_worker.py RANK WORLD_SIZE STORE_FILE SEQ_LEN CAUSAL TRANSPORT

Ranks meet through a torch.distributed FileStore; the ring's transport is flashlm's shared-memory ring
(TRANSPORT "shm", Ring.sendrecv) or GlooRing ("gloo": sendrecv written with torch.distributed's isend/irecv, an
independent transport for comparison). Every rank builds
the same whole sequence, runs ring attention forward and backward on its zig-zag shard, and checks its shard of
the output and of the gradients against the float64 reference by test_parallel_context's rule. Prints "checked" on success; any failure raises.
"""

import os
import sys

import torch
import torch.distributed as tdist

from test_parallel_context import check_against_single_device
from flashlm.flash_attn_interface import flash_attn_func
from flashlm.ops import comm
from flashlm.parallel.context import SequenceLayout, ring_attention, shard_sequence
from reference import attention_with_grads


class GlooRing:
    """sendrecv over torch.distributed point-to-point calls: to rank + 1, from rank - 1, both in flight at once."""

    def __init__(self):
        self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()

    def sendrecv(self, send, recv):
        requests = []
        if send is not None:
            requests.append(tdist.isend(send.contiguous(), (self.rank + 1) % self.world_size))
        if recv is not None:
            requests.append(tdist.irecv(recv, (self.rank - 1) % self.world_size))
        for request in requests:
            request.wait()


def shm_ring(store, rank, world):
    if rank == 0:
        store.set("job", f"context-{os.getpid()}")
    return comm.shm_ring(store.get("job").decode(), rank, world, timeout=60)


def main(rank, world, store_file, seq_len, causal, transport):
    store = tdist.FileStore(store_file, world)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    ring = shm_ring(store, rank, world) if transport == "shm" else GlooRing()
    layout = SequenceLayout(seq_len, world)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(seq_len)
        q, k, v, dout = (torch.randn(2, seq_len, h, 32, generator=g).to(dtype) for h in (4, 2, 2, 4))
        leaves = [shard_sequence(t, layout, rank).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*leaves, ring, layout, causal)
        out.backward(shard_sequence(dout, layout, rank))

        single = [t.clone().requires_grad_() for t in (q, k, v)]
        single_out = flash_attn_func(*single, causal=causal)
        single_out.backward(dout)
        ref_out, _, ref_grads = attention_with_grads(*(t.double() for t in (q, k, v)), dout.double(), causal=causal)
        base_out, _, base_grads = attention_with_grads(q, k, v, dout, causal=causal)
        for name, got, one, ref, base in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                                             [single_out] + [t.grad for t in single], [ref_out, *ref_grads],
                                             [base_out, *base_grads]):
            one, ref, base = (shard_sequence(t.detach(), layout, rank) for t in (one, ref, base))
            check_against_single_device(f"rank {rank} {name} {dtype}", got.detach(), one, ref, base, world)
    tdist.destroy_process_group()
    print("checked", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), bool(int(sys.argv[5])), sys.argv[6])
