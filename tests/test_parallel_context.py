"""Context parallelism (flashlm.parallel.context): ring attention against single-device flash attention.

The exactness tests run all cp ranks in this process, one thread per rank, over SimulatedRing, a transport
that hands each rank's tensor to its right neighbour at a barrier. The rule is test_attention.py's: the ring's
output, lse and gradients (the ranks' shards gathered back into the whole sequence) are compared with the
float64 reference (reference.py): flash-attn's rule against a torch baseline in the same dtype, as in
test_attention.py (the single-device kernel is held to it too), and cp + 1 times the error of flashlm's own
single-device flash attention on the whole sequence, plus the dtype's floor (check_against_single_device says
why). Multi-process cases do the same over flashlm's shared-memory ring and over torch.distributed's gloo
(tests/context_worker.py).
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

from compare import assert_close_to_reference, assert_equal
from conftest import per_device
from flashlm.flash_attn_interface import flash_attn_func
from flashlm.parallel.context import (SequenceLayout, _blocks, gather_sequence, ring_attention,
                                      ring_attention_forward, shard_sequence)
from reference import attention_with_grads

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context_worker.py")


class SimulatedRing:
    """cp ranks of one process, each on its own thread; ring.rank(r) is rank r's transport. sendrecv blocks
    until every rank has called it (a barrier with a timeout, so a rank that stops early fails the others rather
    than hanging them) and counts each rank's calls and the bytes it sends."""

    def __init__(self, size, timeout=60):
        self.size = size
        self.slots = [None] * size
        self.calls = [0] * size
        self.bytes_sent = [0] * size
        self.barrier = threading.Barrier(size, timeout=timeout)

    def rank(self, r):
        ring = self

        class Rank:
            rank, world_size = r, ring.size

            def sendrecv(self, send, recv):
                ring.slots[r] = send
                ring.calls[r] += 1
                ring.bytes_sent[r] += 0 if send is None else send.numel() * send.element_size()
                ring.barrier.wait()
                got = ring.slots[(r - 1) % ring.size]
                if recv is not None:
                    assert got is not None and got.shape == recv.shape and got.dtype == recv.dtype, \
                        f"rank {r} expects {tuple(recv.shape)} {recv.dtype}, its left sends " \
                        f"{None if got is None else (tuple(got.shape), got.dtype)}"
                    recv.copy_(got)
                ring.barrier.wait()  # the sender may reuse its tensor only once its neighbour has copied it

        return Rank()

    def run(self, fn):
        """fn(rank, transport) on every rank at once; their results, in rank order. Re-raises a rank's error."""
        results, errors = [None] * self.size, []

        def main(r):
            try:
                results[r] = fn(r, self.rank(r))
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                errors.append((r, e))
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            r, e = min(errors, key=lambda x: isinstance(x[1], threading.BrokenBarrierError))
            raise AssertionError(f"rank {r} failed: {e!r}") from e
        return results


def random_qkv(seq_len, heads, kv_heads, dtype, batch=2, d=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq_len, h, d, generator=g).to(device, dtype)
                 for h in (heads, kv_heads, kv_heads, heads))  # q, k, v, dout


def ring_run(layout, q, k, v, dout, causal):
    """The ring's out, lse and (dq, dk, dv) over the whole sequence (each rank's shards gathered), each rank's
    sendrecv calls in the forward and in all, and the bytes all ranks sent."""
    ring = SimulatedRing(layout.cp)

    def rank_main(r, transport):
        leaves = [shard_sequence(t, layout, r).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*leaves, transport, layout, causal)
        forward_calls = ring.calls[r]
        out.backward(shard_sequence(dout, layout, r))
        with torch.no_grad():  # the lse, by the raw forward (one more walk around the ring)
            _, lse = ring_attention_forward(*(t.detach() for t in leaves), transport, layout, causal)
        return out.detach(), lse, [t.grad for t in leaves], forward_calls

    results = ring.run(rank_main)
    out = gather_sequence([r[0] for r in results], layout)
    lse = gather_sequence([r[1] for r in results], layout, dim=2)
    grads = [gather_sequence([r[2][i] for r in results], layout) for i in range(3)]
    return out, lse, grads, [r[3] for r in results], ring.calls, sum(ring.bytes_sent)


def single_device(q, k, v, dout, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in leaves]


def check_against_single_device(name, ring_t, one, ref, base, cp, floor=None):
    """The ring's error against the float64 reference: flash-attn's rule against the torch baseline (when given),
    and at most cp + 1 times the single-device kernel's error (plus the floor). Why cp + 1: every element of the
    ring's result sums the results of up to cp kernel calls (one per block it meets), each already rounded to the
    dtype, and is rounded once more at the end; the single-device kernel rounds once."""
    if base is not None:
        assert_close_to_reference(ring_t, ref, base, floor, name=f"ring {name}", relative_floor=True)
    assert_close_to_reference(ring_t, ref, one, floor, name=f"ring {name} (against single-device)",
                              relative_floor=True, multiple=cp + 1)


def check_ring(layout, heads, kv_heads, dtype, causal, batch=2, device="cpu"):
    q, k, v, dout = random_qkv(layout.seq_len, heads, kv_heads, dtype, batch, device=device)
    out, lse, grads, forward_calls, calls, bytes_sent = ring_run(layout, q, k, v, dout, causal)
    cp = layout.cp
    # K/V move cp - 1 times forward; backward K/V cp - 1 times and dK/dV cp times; then the lse's forward. Each
    # move of every rank's block carries the whole sequence's K and V (dK and dV in float32) once.
    assert forward_calls == [cp - 1] * cp and calls == [(cp - 1) * 3 + cp if cp > 1 else 0] * cp
    kv_bytes = 2 * k.numel() * k.element_size()
    assert bytes_sent == (3 * (cp - 1) * kv_bytes + cp * kv_bytes * 4 // k.element_size() if cp > 1 else 0)

    one_out, one_lse, one_grads = single_device(q, k, v, dout, causal)
    ref_out, ref_lse, ref_grads = attention_with_grads(*(t.double() for t in (q, k, v)), dout.double(), causal=causal)
    base_out, _, base_grads = attention_with_grads(q, k, v, dout, causal=causal)
    for name, ring_t, one, ref, base in zip(("out", "dq", "dk", "dv"), [out, *grads], [one_out, *one_grads],
                                            [ref_out, *ref_grads], [base_out, *base_grads]):
        assert ring_t.dtype == dtype and ring_t.shape == one.shape
        assert_close_to_reference(one, ref, base, name=f"single-device {name}", relative_floor=True)
        check_against_single_device(name, ring_t, one, ref, base, cp)
    assert_close_to_reference(one_lse, ref_lse, None, 1e-5, name="single-device lse", relative_floor=True)
    check_against_single_device("lse", lse, one_lse, ref_lse, None, cp, floor=1e-5)


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_ring_equals_single_device(device, dtype, cp, causal):
    check_ring(SequenceLayout(64 * cp, cp), 4, 2, dtype, causal, device=device)


@pytest.mark.parametrize("seq_len,cp", [(37, 3), (9, 4), (8, 4), (101, 2), (5, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_uneven_lengths(seq_len, cp, causal):
    # ragged chunks: lengths differ by one, down to chunks of a single token
    check_ring(SequenceLayout(seq_len, cp), 4, 2, torch.float32, causal)


@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (6, 3), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa(heads, kv_heads, dtype):
    check_ring(SequenceLayout(90, 3), heads, kv_heads, dtype, causal=True)


@pytest.mark.parametrize("seq_len,cp", [(100, 3), (77, 4), (20, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_contiguous_layout(seq_len, cp, causal):
    check_ring(SequenceLayout(seq_len, cp, zigzag=False), 4, 2, torch.float32, causal)


def test_one_rank_is_single_device_attention():
    check_ring(SequenceLayout(50, 1), 4, 1, torch.bfloat16, causal=True)


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(cp):
    # Under a causal mask each rank computes the same number of (query, key) pairs with zig-zag sharding; a
    # contiguous layout gives the last rank 2 cp - 1 times the first's.
    def work(layout, rank):
        return sum(qn * kn if not masked else qn * (qn + 1) // 2
                   for origin in range(layout.cp) for _, qn, _, kn, masked in _blocks(layout, rank, origin, True))

    seq_len = 2 * cp * 16
    zigzag = [work(SequenceLayout(seq_len, cp), r) for r in range(cp)]
    assert len(set(zigzag)) == 1 and sum(zigzag) == seq_len * (seq_len + 1) // 2
    contiguous = [work(SequenceLayout(seq_len, cp, zigzag=False), r) for r in range(cp)]
    assert sum(contiguous) == sum(zigzag) and contiguous[-1] > contiguous[0]


# --- layout: shard and gather ------------------------------------------------------------------------------------

@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("seq_len,cp", [(8, 1), (16, 2), (17, 2), (37, 3), (8, 4), (103, 4)])
def test_shard_gather_round_trip(seq_len, cp, zigzag):
    layout = SequenceLayout(seq_len, cp, zigzag)
    tokens = torch.randint(0, 1000, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    shards = [shard_sequence(tokens, layout, r) for r in range(cp)]
    assert_equal(gather_sequence(shards, layout), tokens, name="gathered tokens")
    # the positions each rank holds are those of its tokens, every position exactly once
    positions = [layout.positions(r) for r in range(cp)]
    for r in range(cp):
        assert_equal(shards[r], tokens[:, positions[r]], name=f"rank {r}'s tokens")
        assert_equal(positions[r], shard_sequence(torch.arange(seq_len), layout, r, dim=0), name="positions")
    assert_equal(torch.cat(positions).sort().values, torch.arange(seq_len), name="positions of all ranks")
    # chunk lengths differ by at most one; zig-zag: rank r holds chunks r and 2 cp - 1 - r
    lengths = [layout.chunk(i)[1] for i in range(layout.num_chunks)]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    if zigzag:
        first = layout.chunk(0)
        assert_equal(shards[0][:, first[1]:], tokens[:, layout.chunk(2 * cp - 1)[0]:], name="rank 0's second chunk")
    x = torch.randn(2, seq_len, 3, 4)  # other dimensions, negative dim
    assert_equal(gather_sequence([shard_sequence(x, layout, r, dim=-3) for r in range(cp)], layout, dim=-3), x,
                 name="gathered [batch, seq, heads, dim]")


def test_zigzag_chunks():
    layout = SequenceLayout(10, 2)
    assert [layout.chunk(i) for i in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert layout.positions(0).tolist() == [0, 1, 2, 8, 9] and layout.positions(1).tolist() == [3, 4, 5, 6, 7]


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,cp,zigzag,error,match", [
    (10, 0, True, ValueError, "cp: must be >= 1"),
    (10, -2, False, ValueError, "cp: must be >= 1"),
    (10, 2.0, True, TypeError, "cp: expected an integer"),
    (10, True, True, TypeError, "cp: expected an integer"),
    (7, 4, True, ValueError, "seq_len: 7 is shorter than the 8 chunks"),
    (3, 4, False, ValueError, "seq_len: 3 is shorter than the 4 chunks"),
    ("8", 2, True, TypeError, "seq_len: expected an integer"),
    (8, 2, 1, TypeError, "zigzag: expected a bool"),
])
def test_bad_layout(seq_len, cp, zigzag, error, match):
    with pytest.raises(error, match=match):
        SequenceLayout(seq_len, cp, zigzag)


def test_bad_shard_and_gather():
    layout = SequenceLayout(12, 2)
    x = torch.zeros(2, 12)
    with pytest.raises(ValueError, match="x: dimension 1 has 11 tokens"):
        shard_sequence(torch.zeros(2, 11), layout, 0)
    with pytest.raises(ValueError, match="rank: must be in"):
        shard_sequence(x, layout, 2)
    with pytest.raises(ValueError, match="dim: must be in"):
        shard_sequence(x, layout, 0, dim=2)
    with pytest.raises(ValueError, match="x: a 0-d tensor"):
        shard_sequence(torch.tensor(1.0), layout, 0)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        shard_sequence([1, 2], layout, 0)
    shards = [shard_sequence(x, layout, r) for r in range(2)]
    with pytest.raises(ValueError, match="shards: expected a sequence of cp=2 tensors, got 1"):
        gather_sequence(shards[:1], layout)
    with pytest.raises(ValueError, match=r"shards\[1\]: expected 6 tokens"):
        gather_sequence([shards[0], shards[1][:, :5]], layout)
    with pytest.raises(ValueError, match="rank: must be in"):
        layout.positions(-1)


def test_bad_ring_arguments():
    layout = SequenceLayout(12, 2)
    q, k, v, _ = random_qkv(12, 4, 2, torch.float32)
    local = [shard_sequence(t, layout, 0) for t in (q, k, v)]

    class Lone:  # a transport that must never be reached: every error comes before the first message
        rank, world_size = 0, 2

        def sendrecv(self, send, recv):
            raise AssertionError("sendrecv reached")

    with pytest.raises(ValueError, match="transport.world_size: 3 ranks, the layout is for cp=2"):
        ring_attention(*local, type("T", (Lone,), {"world_size": 3})(), layout)
    with pytest.raises(ValueError, match="transport.rank: must be in"):
        ring_attention(*local, type("T", (Lone,), {"rank": 2})(), layout)
    with pytest.raises(TypeError, match="transport: object has no `rank`"):
        ring_attention(*local, object(), layout)
    with pytest.raises(TypeError, match="layout: expected a SequenceLayout"):
        ring_attention(*local, Lone(), 12)
    with pytest.raises(ValueError, match="q: rank 0 holds 6 of the 12 tokens"):
        ring_attention(q, *local[1:], Lone(), layout)
    with pytest.raises(ValueError, match="v: expected shape"):
        ring_attention(*local[:2], local[2][:, :, :1], Lone(), layout)
    with pytest.raises(ValueError, match="k: shape .* does not go with q's"):
        ring_attention(local[0][:, :, :3], *local[1:], Lone(), layout)
    with pytest.raises(TypeError, match="k, v: dtypes"):
        ring_attention(local[0], *(t.bfloat16() for t in local[1:]), Lone(), layout)
    with pytest.raises(ValueError, match="q: expected 4 dimensions|q: expected shape"):
        ring_attention(local[0][0], *local[1:], Lone(), layout)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        ring_attention(*local, Lone(), layout, causal=1)


# --- several processes over flashlm's shared-memory ring and over gloo ----------------------------------------------

@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize("world,seq_len,causal", [(2, 50, True), (3, 61, False)])
def test_processes(world, seq_len, causal, transport, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}
    args = [str(world), str(tmp_path / "store"), str(seq_len), str(int(causal)), transport]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} ranks did not finish within 120 s")
    for r, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} failed (exit {p.returncode}):\n{err[-5000:]}"
        assert "checked" in out
