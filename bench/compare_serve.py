#!/usr/bin/env python3
"""compare_serve: `flashlm serve` against llama.cpp's server (llama-cpp-python's `llama_cpp.server`), the same
GGUF model behind each, driven by the same async client (httpx) over loopback.

The model is compare_decode.py's random-weight Llama-style GGUF (a byte-level BPE trained there) at a smaller
default size. Each server runs in its own process with the same thread count; the client sends --requests
streaming /v1/completions at each concurrency (1, 4, 16, 64 by default), every prompt --prompt-tokens long
and every output --gen-tokens long (flashlm: ignore_eos; llama_cpp.server has no such field, and its logit_bias
and min_tokens fail in this version (a ValueError in its logits processing), so an output of the random model
may end early at EOS, about 1 token in the vocabulary's size: the count of such requests is printed), and
measures:
  output tok/s   output tokens (streamed chunks) of all requests / the wall time of the whole batch;
  TTFT p50/p99   from sending a request to its first streamed token;
  ITL p50/p99    between consecutive streamed tokens of one request (both servers send a chunk per token, its
                 text empty while a UTF-8 character is incomplete);
then prints flashlm / llama.cpp ratios, and flashlm's engine busy share (the engine's step time over the
wall time, read from /metrics): what the server's HTTP, detokenization and SSE leave to the model.

llama_cpp.server serves one request at a time (no batching across requests); flashlm's engine batches every
running request into each step.

Run (from the repository root, with flashlm, llama-cpp-python[server] and httpx installed):
  python bench/compare_serve.py --prompt-tokens 16 --gen-tokens 8   # bench/results/serve.md's table
  python bench/compare_serve.py --concurrency 1 16 --requests 32 --type Q4_0
  python bench/compare_serve.py --quick      # seconds: CI smoke (flashlm only without llama_cpp.server)
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import bench_util
from compare_decode import make_gguf

MODEL = "bench"
# The model's context and llama.cpp's n_ctx: well past the measured lengths (llama_cpp.server failed with an
# n_ctx of prompt + output + 64 here: a ValueError in its scores array once n_past passed it).
CONTEXT = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a subprocess, up once GET /v1/models answers."""

    def __init__(self, name, argv, port, env=None):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout=300):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_flashlm(path, args) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "flashlm", "serve", path, "--port", str(port), "--served-model-name", MODEL,
            "--max-num-seqs", str(max(args.concurrency)), "--log-level", "warning"]
    if args.kv_dtype:
        argv += ["--kv-cache-dtype", args.kv_dtype]
    env = dict(os.environ, FLASHLM_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    return ServerProcess("flashlm serve", argv, port, env)


def start_llama_cpp(path, args, context) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port), "--model_alias", MODEL,
            "--n_ctx", str(context), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--interrupt_requests", "False", "--verbose", "False"]  # by default a new request cuts the running one
    return ServerProcess("llama_cpp.server", argv, port)


async def one_request(client, url, body, extra):
    """(TTFT, [gaps between streamed pieces], pieces, finish_reason) of one streamed completion."""
    start = time.perf_counter()
    first, last, itl, finish, pieces = None, None, [], None, 0
    body = dict(body, **extra)
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices"):
                continue
            c = chunk["choices"][0]
            finish = c.get("finish_reason") or finish
            if c.get("finish_reason") and not c.get("text"):
                continue  # a closing chunk that carries no token (llama.cpp sends one)
            now = time.perf_counter()
            pieces += 1
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last = now
    return (None if first is None else first - start), itl, pieces, finish


async def run_level(url, prompts, args, concurrency, n_requests, extra):
    import httpx

    body = {"model": MODEL, "max_tokens": args.gen_tokens, "temperature": 0, "stream": True}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def bounded(i):
            async with sem:
                return await one_request(client, url, dict(body, prompt=prompts[i % len(prompts)]), extra)
        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n_requests)))
        wall = time.perf_counter() - start
    early = sum(r[3] != "length" for r in results)
    if early:
        print(f"  note: {early} of {n_requests} requests ended before {args.gen_tokens} tokens ({set(r[3] for r in results)})")
    ttft = [r[0] for r in results if r[0] is not None]
    itl = [g for r in results for g in r[1]]
    return {"tok_s": sum(r[2] for r in results) / wall, "ttft": ttft, "itl": itl, "wall": wall}


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def engine_seconds(url) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("flashlm:engine_step_seconds{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def make_prompts(url, tokens: int, count: int) -> list:
    """`count` different text prompts of exactly `tokens` tokens in the model's tokenizer (counted by flashlm's
    /tokenize): no request finds another's prompt in a prefix cache."""
    import httpx

    prompts = []
    for i in range(count):
        words = " ".join(f"word{(i + j) % 97} w{(i * 7 + j) % 13}{j % 7}" for j in range(tokens * 2))
        ids = httpx.post(url + "/tokenize", json={"prompt": words, "add_special_tokens": False}).json()["tokens"]
        prompts.append(httpx.post(url + "/detokenize", json={"tokens": ids[:tokens]}).json()["prompt"])
    return prompts


def bench_server(server, prompts, args, extra, flashlm_metrics=False) -> dict:
    try:
        return _bench_levels(server, prompts, args, extra, flashlm_metrics)
    except Exception:
        server.close()  # what the server said before it failed, for the report
        print(f"{server.name} failed; its stderr ends with:\n{server.proc.stderr.read()[-3000:]}", file=sys.stderr)
        raise


def _bench_levels(server, prompts, args, extra, flashlm_metrics) -> dict:
    out = {}
    asyncio.run(run_level(server.url, prompts[-2:], args, 1, 2, extra))  # warm-up
    for c in args.concurrency:
        n = max(args.requests, c) if c > 1 else max(args.requests // 4, 2)
        before = engine_seconds(server.url) if flashlm_metrics else None
        r = asyncio.run(run_level(server.url, prompts[:-2], args, c, n, extra))
        if flashlm_metrics:
            r["busy"] = (engine_seconds(server.url) - before) / r["wall"]
        out[c] = r
        print(f"  {server.name}: concurrency {c}: {r['tok_s']:.1f} tok/s, {n} requests in {r['wall']:.1f} s")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--type", default="Q8_0", help="GGUF type of the model (default Q8_0)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least the level)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--kv-dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--no-llama-cpp", action="store_true", help="flashlm only")
    p.add_argument("--quick", action="store_true", help="a tiny model and few requests (CI smoke)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `timeout` still stops the servers (finally)
    if args.quick:
        args.layers, args.d_model, args.heads, args.kv_heads, args.vocab = 2, 128, 4, 2, 512
        args.prompt_tokens, args.gen_tokens, args.concurrency, args.requests = 16, 8, [1, 4], 8
    try:
        import llama_cpp.server  # noqa: F401
        have_llama = not args.no_llama_cpp
    except ImportError:
        have_llama = False
        print("llama_cpp.server not installed (pip install 'llama-cpp-python[server]'): flashlm only")

    with tempfile.TemporaryDirectory() as folder:
        context = max(CONTEXT, args.prompt_tokens + args.gen_tokens + 64)
        room = argparse.Namespace(**{**vars(args), "gen_tokens": context - 8 - args.prompt_tokens})
        path, n_params = make_gguf(folder, room, args.type)
        print(f"model: {n_params / 1e6:.1f}M parameters, {args.type}, prompt {args.prompt_tokens} tokens, "
              f"output {args.gen_tokens} tokens; {args.threads} threads per server")
        results = {}
        flashlm = start_flashlm(path, args).wait_ready()
        try:
            prompts = make_prompts(flashlm.url, args.prompt_tokens, max(args.requests, *args.concurrency) + 2)
            results["flashlm"] = bench_server(flashlm, prompts, args, {"ignore_eos": True}, flashlm_metrics=True)
        finally:
            flashlm.close()
        if have_llama:
            llama = start_llama_cpp(path, args, context).wait_ready()
            try:
                results["llama.cpp"] = bench_server(llama, prompts, args, {})
            finally:
                llama.close()
    report(results, args)


def report(results, args):
    header = ["concurrency", "server", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
              "engine busy"]
    rows = []
    for c in args.concurrency:
        for name, res in results.items():
            r = res[c]
            rows.append([str(c), name, f"{r['tok_s']:.1f}"] +
                        [bench_util.fmt(None if pct(xs, q) is None else 1e3 * pct(xs, q), ".1f")
                         for xs in (r["ttft"], r["itl"]) for q in (50, 99)] +
                        [f"{100 * r['busy']:.0f}%" if "busy" in r else ""])
    bench_util.print_table(header, rows)
    if "llama.cpp" in results:
        print("\nflashlm / llama.cpp:")
        for c in args.concurrency:
            f, l_ = results["flashlm"][c], results["llama.cpp"][c]
            print(f"  concurrency {c}: throughput {f['tok_s'] / l_['tok_s']:.2f}x, "
                  f"ITL p99 {pct(f['itl'], 99) / pct(l_['itl'], 99):.2f}x, "
                  f"TTFT p50 {pct(f['ttft'], 50) / pct(l_['ttft'], 50):.2f}x")
    f = results["flashlm"]
    if 1 in f and 16 in f:
        print(f"flashlm ITL p99 at concurrency 16 / at 1: {pct(f[16]['itl'], 99) / pct(f[1]['itl'], 99):.2f}x")


if __name__ == "__main__":
    main()
