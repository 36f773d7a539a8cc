"""One rank of a multi-process test of flashlm.dist (tests/test_dist.py starts N of these).

    python dist_worker.py SCENARIO RANK WORLD_SIZE STORE_FILE

Ranks meet through a torch.distributed FileStore (or, for `env_init`, torchrun's environment variables
with a TCPStore on 127.0.0.1). A scenario returns normally on success; any exception fails the rank with
its traceback on stderr. Lines "RESULT <json>" on stdout report what the test checks beyond success.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as tdist

import flashlm.dist as fd
from compare import assert_equal
from flashlm.ops import comm

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def exact_values(n, rank, iteration=0):
    """Small integers: every sum over <= 4 ranks is exact in f32, f16 and bf16."""
    i = torch.arange(n, dtype=torch.int64)
    return ((i * 7 + rank * 3 + iteration * 5) % 23 - 11).to(torch.float64)


def join_group(rank, world, store_file):
    store = tdist.FileStore(store_file, world)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def collectives(rank, world, store_file):
    """Every size, dtype and op, exact and against gloo; reduce_scatter, all_gather, broadcast; repeats; with
    3 ranks also the slice schedules (check_schedules)."""
    join_group(rank, world, store_file)
    fd.init(timeout=20)
    assert fd.cpu_transport() == "shm"
    for n in sorted({0, 1, 7, world - 1, 1_000_003}):
        for dtype in DTYPES:
            for op in ("sum", "avg"):
                for iteration in range(2 if n > 1000 else 3):  # repeated calls: nothing stale between them
                    t = exact_values(n, rank, iteration).to(dtype)
                    total = sum(exact_values(n, r, iteration) for r in range(world)).to(torch.float32)
                    want = (total if op == "sum" else total / world).to(dtype)
                    ref = t.clone()
                    assert fd.all_reduce(t, op=op) is t
                    tdist.all_reduce(ref)  # gloo, then the average as torch computes it
                    if op == "avg":
                        ref = (ref.float() / world).to(dtype)
                    assert_equal(t, want, name=f"all_reduce n={n} {dtype} {op} iteration {iteration} (exact)")
                    assert_equal(t, ref, name=f"all_reduce n={n} {dtype} {op} (vs gloo)")
    # Values whose sums round: the ring adds in another order than gloo, so both are held to the error
    # bound of a sum of `world` f32 terms around the float64 sum.
    xs = [torch.randn(1_000_003, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    exact = sum(x.double() for x in xs)
    bound = (world - 1) * 2.0**-24 * sum(x.double().abs() for x in xs)
    x, ref = xs[rank].clone(), xs[rank].clone()
    fd.all_reduce(x)
    tdist.all_reduce(ref)
    for name, got in (("flashlm", x), ("gloo", ref)):
        excess = ((got.double() - exact).abs() - bound).max()
        assert excess <= 0, f"random f32 all_reduce ({name}) exceeds the rounding bound by {float(excess)}"

    # reduce_scatter / all_gather through flashlm.dist (first dimension divides by the world size).
    for rows in (0, 1, 5):
        for dtype in DTYPES:
            full = exact_values(world * rows * 3, rank).reshape(world * rows, 3)
            total = sum(exact_values(world * rows * 3, r).reshape(world * rows, 3) for r in range(world))
            shard = fd.reduce_scatter(full.to(dtype))
            assert shard.shape == (rows, 3), shard.shape
            mine = total[rank * rows:(rank + 1) * rows]
            assert_equal(shard, mine.to(dtype), name=f"reduce_scatter rows={rows} {dtype}")
            avg = fd.reduce_scatter(full.to(dtype), op="avg")
            assert_equal(avg, (mine.float() / world).to(dtype), name="reduce_scatter avg")
            gathered = fd.all_gather(torch.full((rows, 2), float(rank + 1), dtype=dtype))
            assert gathered.shape == (world * rows, 2), gathered.shape
            want = torch.arange(1, world + 1, dtype=dtype).repeat_interleave(rows)[:, None].expand(-1, 2)
            assert_equal(gathered, want, name=f"all_gather rows={rows} {dtype}")
    # The raw ring's reduce_scatter and all_gather on counts that do not divide by the world size.
    ring = fd._require().cpu_ring
    for n in (1, 7, 1_000_003):
        t = exact_values(n, rank)
        total = sum(exact_values(n, r) for r in range(world))
        b, e = comm.chunk_bounds(n, world, rank)
        buf = t.float()
        ring.reduce_scatter(buf)
        assert_equal(buf[b:e], total[b:e].float(), name=f"ring reduce_scatter n={n}")
        buf = torch.zeros(n)
        buf[b:e] = float(rank + 1)
        ring.all_gather(buf)
        want = torch.cat([torch.full((comm.chunk_bounds(n, world, r)[1] - comm.chunk_bounds(n, world, r)[0],), float(r + 1))
                          for r in range(world)])
        assert_equal(buf, want, name=f"ring all_gather n={n}")
    # broadcast from every rank, any dtype.
    for src in range(world):
        for n, dtype in ((0, torch.float32), (5, torch.int64), (1_000_003, torch.bfloat16), (300_001, torch.uint8)):
            t = torch.full((n,), rank, dtype=dtype) if rank != src else (torch.arange(n) % 100).to(dtype)
            fd.broadcast(t, src=src)
            assert_equal(t, (torch.arange(n) % 100).to(dtype), name=f"broadcast src={src} n={n} {dtype}")
    # Bad input raises ValueError naming the argument, before any communication.
    for call, name in ((lambda: fd.all_reduce(torch.ones(4, dtype=torch.int32)), "tensor"),
                       (lambda: fd.all_reduce(torch.ones(4), op="max"), "op"),
                       (lambda: fd.all_reduce(torch.ones(4, 4).t()), "tensor"),
                       (lambda: fd.all_reduce([1.0, 2.0]), "tensor"),
                       (lambda: fd.reduce_scatter(torch.ones(world * 2 + 1)), "tensor"),
                       (lambda: fd.broadcast(torch.ones(3), src=world), "src"),
                       (lambda: fd.all_gather(torch.tensor(1.0)), "shard")):
        try:
            call()
        except ValueError as e:
            assert str(e).startswith(name), f"message should name {name!r}: {e}"
        else:
            raise AssertionError(f"no ValueError for bad {name}")
    fd.all_reduce(torch.ones(3))  # the ring still works after rejected calls
    fd.destroy()
    if world == 3:  # uneven chunks; in this run to spare the tests a start of three processes
        check_schedules(rank, world)
    tdist.destroy_process_group()


def check_schedules(rank, world):
    """Raw shm rings with tiny slices (16 floats): many slice columns, partial last columns and chunks without
    a slice in the last column (n=97: chunks of 32, 32, 33), through the relaying schedule in windows of two
    columns (3 slots) and the step-by-step one (1 slot). Windows of one column (the default 2 slots) run in
    `collectives`."""
    store = tdist.distributed_c10d._get_default_store()
    for slice_bytes, slots in ((64, 1), (192, 3)):
        if rank == 0:
            store.set("schedules/job", f"sched-{os.getpid()}-{slice_bytes}-{slots}")
        tdist.barrier()
        ring = comm.shm_ring(store.get("schedules/job").decode(), rank, world, timeout=20, slice_bytes=slice_bytes,
                             slots=slots)
        tdist.barrier()  # every rank has read the job name before rank 0 sets the next
        what = f"slice_bytes={slice_bytes} slots={slots}"
        for n, dtype in ((1, torch.float32), (7, torch.float32), (97, torch.float32), (1203, torch.float32),
                         (1203, torch.bfloat16)):
            total = sum(exact_values(n, r) for r in range(world)).to(torch.float32)
            for op, want in (("sum", total), ("avg", total / world)):
                t = exact_values(n, rank).to(dtype)
                ring.allreduce(t, op)
                assert_equal(t, want.to(dtype), name=f"allreduce {op} {what} n={n} {dtype}")
            b, e = comm.chunk_bounds(n, world, rank)
            t = exact_values(n, rank).to(dtype)
            ring.reduce_scatter(t)
            assert_equal(t[b:e], total[b:e].to(dtype), name=f"reduce_scatter {what} n={n} {dtype}")
            t = torch.zeros(n, dtype=dtype)
            t[b:e] = float(rank + 1)
            ring.all_gather(t)
            want = torch.cat([torch.full((comm.chunk_bounds(n, world, r)[1] - comm.chunk_bounds(n, world, r)[0],),
                                         float(r + 1)) for r in range(world)]).to(dtype)
            assert_equal(t, want, name=f"all_gather {what} n={n} {dtype}")
            src = n % world
            t = (torch.arange(n) % 251).to(torch.uint8) if rank == src else torch.zeros(n, dtype=torch.uint8)
            ring.broadcast(t, src)
            assert_equal(t, (torch.arange(n) % 251).to(torch.uint8), name=f"broadcast {what} n={n}")


def killed_peer(rank, world, store_file):
    """The last rank exits after one allreduce; the others must raise within the timeout, not hang."""
    join_group(rank, world, store_file)
    timeout = 3.0
    fd.init(timeout=timeout)
    t = torch.ones(1000)
    fd.all_reduce(t)
    if rank == world - 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        fd.all_reduce(torch.ones(100_000))
    except RuntimeError as e:
        report(rank=rank, seconds=time.monotonic() - t0, message=str(e))
        try:  # the ring stays failed, and says so at once
            fd.all_reduce(torch.ones(10))
        except RuntimeError as again:
            report(rank=rank, again=str(again))
        os._exit(0)
    raise AssertionError("all_reduce with a dead peer did not raise")


def mismatch(rank, world, store_file):
    """Ranks calling allreduce with different sizes get an error, not wrong data."""
    join_group(rank, world, store_file)
    fd.init(timeout=3.0)
    try:
        fd.all_reduce(torch.ones(1000 + 500 * rank))
    except RuntimeError as e:
        report(rank=rank, message=str(e))
        os._exit(0)
    raise AssertionError("mismatched allreduce did not raise")


def shared_ring(rank, world, name, **options):
    """A raw shm ring whose job name rank 0 makes and hands to the others through the store."""
    store = tdist.distributed_c10d._get_default_store()
    if rank == 0:
        store.set(f"ring/{name}", f"{name}-{os.getpid()}-{time.monotonic_ns()}")
    tdist.barrier()
    ring = comm.shm_ring(store.get(f"ring/{name}").decode(), rank, world, **options)
    tdist.barrier()  # every rank has read the name
    return ring


def message_of(n, rank, dtype):
    """What rank `rank` sends: n elements (0 included) that differ by position, rank and call."""
    i = torch.arange(n, dtype=torch.int64) * 31 + rank * 7
    if dtype == torch.bool:
        return i % 3 == 0
    return (i % 101 - 50).to(dtype)


def sendrecv(rank, world, store_file):
    """A ring shift (each rank sends to rank + 1 and receives from rank - 1) for several dtypes and sizes, 0
    and past the slice size included, with sizes that differ per rank (so a call sends and receives different
    sizes); then one-sided calls: rank 0 sends, rank 1 receives, the others stay out."""
    join_group(rank, world, store_file)
    left, right = (rank - 1) % world, (rank + 1) % world
    for options in ({"slice_bytes": 256}, {}):  # tiny slices (many per message), then the default 1 MiB
        ring = shared_ring(rank, world, f"sr{len(options)}", timeout=20, **options)
        for n in (0, 1, 63, 1000, 300_007):
            for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool):
                send = message_of(n + rank, rank, dtype)
                recv = torch.empty(n + left, dtype=dtype)
                assert ring.sendrecv(send, recv) is recv
                assert_equal(recv, message_of(n + left, left, dtype), name=f"sendrecv {options} n={n} {dtype}")
                assert_equal(send, message_of(n + rank, rank, dtype), name="sendrecv leaves send alone")
        for n in (0, 5000):
            if rank == 0:
                ring.sendrecv(send=message_of(n, 0, torch.float32).view(10, -1) if n else torch.empty(0))
            elif rank == 1:
                recv = ring.sendrecv(recv=torch.empty(n))
                assert_equal(recv, message_of(n, 0, torch.float32), name=f"one-sided {options} n={n}")
            ring.sendrecv()  # neither side: nothing moves
        tdist.barrier()
    report(rank=rank, ok=True)
    tdist.destroy_process_group()


def sendrecv_mismatch(rank, world, store_file):
    """Two ranks whose messages differ in size, then in dtype: the receiver raises naming both."""
    join_group(rank, world, store_file)
    for name, (send, recv) in (("size", (torch.ones(100), torch.empty(100 if rank == 0 else 50))),
                               ("dtype", (torch.ones(100), torch.empty(100, dtype=torch.int32 if rank else torch.float32)))):
        ring = shared_ring(rank, world, f"mis{name}", timeout=5)
        try:
            ring.sendrecv(send, recv)
            ring.sendrecv(send, recv)  # rank 0's first call could succeed; this one fails after rank 1's abort
        except RuntimeError as e:
            report(rank=rank, case=name, message=str(e))
        tdist.barrier()
    tdist.destroy_process_group()


def sendrecv_dead_peer(rank, world, store_file):
    """Rank 1 of a 2-rank ring exits after one exchange; rank 0's next receive raises within the timeout."""
    join_group(rank, world, store_file)
    ring = shared_ring(rank, world, "dead", timeout=3.0)
    ring.sendrecv(torch.ones(10), torch.empty(10))
    if rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        ring.sendrecv(torch.ones(10), torch.empty(10))
        ring.sendrecv(recv=torch.empty(10))
    except RuntimeError as e:
        report(rank=rank, seconds=time.monotonic() - t0, message=str(e))
        os._exit(0)
    raise AssertionError("sendrecv with a dead peer did not raise")


def grad_sync(rank, world, store_file):
    """GradientSync's gradients equal the per-rank gradients averaged by hand (gloo), over several steps."""
    join_group(rank, world, store_file)
    fd.init(timeout=20)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 4))
    unused = torch.nn.Parameter(torch.ones(3))  # used on rank 0 only: the other ranks contribute zeros
    reference = [p.detach().clone().requires_grad_() for p in list(model.parameters()) + [unused]]
    sync = fd.GradientSync(list(model.parameters()) + [unused], bucket_mb=0.005)  # several buckets
    assert sync.num_buckets > 2, sync.num_buckets
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * step + rank))
        for p in model.parameters():
            if step == 2:
                p.grad.zero_()  # the grads are bucket views now: accumulate in place
            else:
                p.grad = None
        unused.grad = None
        loss = model(x).square().mean() + (unused.sum() if rank == 0 else 0.0)
        loss.backward()
        sync.wait()
        # The reference: the same model as plain tensors, gradients averaged with gloo.
        w1, b1, w2, b2, w3, b3, u = reference
        h = torch.nn.functional.gelu(x @ w1.t() + b1)
        h = torch.nn.functional.gelu(h @ w2.t() + b2)
        ref_loss = (h @ w3.t() + b3).square().mean() + (u.sum() if rank == 0 else 0.0 * u.sum())
        grads = torch.autograd.grad(ref_loss, reference)
        for i, (p, g) in enumerate(zip(list(model.parameters()) + [unused], grads)):
            g = g.clone()
            tdist.all_reduce(g)
            g /= world
            err = float((p.grad - g).abs().max())
            assert err <= 1e-6 * max(1.0, float(g.abs().max())), f"step {step} param {i}: max error {err}"
    with sync.no_sync():  # accumulate two backward passes locally, then sync their sum
        model(torch.ones(2, 16)).sum().backward()
    model(torch.ones(2, 16)).sum().backward()
    sync.wait()
    sync.remove()
    fd.destroy()
    tdist.destroy_process_group()


def env_init(rank, world, port):
    """init() from torchrun's environment variables, with no process group yet."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fd.init(timeout=20)
    assert fd.get_rank() == rank and fd.get_world_size() == world
    t = torch.full((10,), float(rank))
    fd.all_reduce(t, op="avg")
    assert_equal(t, torch.full((10,), sum(range(world)) / world), name="all_reduce after env init")
    fd.destroy()
    assert not tdist.is_initialized()


def cuda_allreduce(rank, world, store_file):
    """GPU ring vs torch's NCCL allreduce (needs world_size GPUs)."""
    torch.cuda.set_device(rank)
    join_group(rank, world, store_file)
    fd.init(timeout=60)
    nccl_group = tdist.new_group(backend="nccl")
    for n in (0, 1, 7, world - 1, 1_000_003, 50_000_000):
        for dtype in DTYPES:
            for op in ("sum", "avg"):
                t = exact_values(n, rank).to(dtype).cuda()
                ref = t.clone()
                fd.all_reduce(t, op=op)
                tdist.all_reduce(ref, group=nccl_group)
                if op == "avg":
                    ref = (ref.float() / world).to(dtype)
                torch.cuda.synchronize()
                assert_equal(t.cpu(), ref.cpu(), name=f"cuda all_reduce n={n} {dtype} {op}")
    fd.destroy()
    tdist.destroy_process_group()


if __name__ == "__main__":
    scenario, rank, world, arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if scenario == "env_init":
        env_init(rank, world, int(arg))
    else:
        globals()[scenario](rank, world, arg)
