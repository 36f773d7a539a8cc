"""Tensor-parallel serving (runtime/tensor_parallel.py) against one process: LLM(..., tensor_parallel_size=N) runs
N CPU processes and must pick the same greedy tokens as LLM(...) alone on the same requests, for HF llama (GQA: K/V
heads split at N=2, replicated at N=4), HF gpt2 (biases on the row-parallel o and proj) and GGUF Q8_0 / Q4_0
files (blocks sliced without decoding), with chunked prefills, requests joining a running batch and prefix-cache
hits. Also: sizes refused before any process starts, a killed worker failing the driver's step (not hanging),
close() leaving no process, the step message's round trip, and `flashlm serve --tensor-parallel-size 2`.
"""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_loaders import V, make_hf  # noqa: E402

from flashlm.cli import main as cli_main  # noqa: E402
from flashlm.models.transformer import PagedBatch  # noqa: E402
from flashlm.runtime.engine import LLM  # noqa: E402
from flashlm.runtime.sampling_params import SamplingParams  # noqa: E402
from flashlm.runtime.tensor_parallel import pack_step, payload_size, unpack_step  # noqa: E402

# A shared 8-token prefix (two blocks of 4): the requests that join later hit the first one's cached blocks.
PREFIX = [5, 17, 33, 2, 61, 90, 7, 12]
PROMPTS = [PREFIX + [100, 101, 102], PREFIX + [200], PREFIX + [44, 45, 46, 47, 48, 49], [250, 3]]
MAX_TOKENS = [10, 8, 12, 6]
ENGINE = dict(block_size=4, max_num_batched_tokens=8, max_num_seqs=4)  # prefills in chunks of up to 8 tokens


class _NoText:
    eos_token_ids = ()

    def decode(self, ids):
        return ""


@pytest.fixture(autouse=True)
def one_thread_workers(monkeypatch):
    # The workers inherit the environment: one thread each on a machine of few cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FLASHLM_NUM_THREADS", "1")


def _child_processes(pid=None) -> list:
    """The children of process `pid` (this one by default) but the one the "spawn" start method keeps until exit,
    multiprocessing's resource tracker."""
    return [p for p in psutil.Process(pid).children() if "resource_tracker" not in " ".join(p.cmdline())]


def _no_children():
    return multiprocessing.active_children() == [] and _child_processes() == []


def _greedy(llm: LLM):
    """The greedy tokens of PROMPTS, the first running alone for a few steps before the others join it; and the
    prompt tokens the prefix cache supplied."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    ids = [llm.add_request(PROMPTS[0], params[0])]
    for _ in range(4):
        llm.step()
    ids += [llm.add_request(p, sp) for p, sp in zip(PROMPTS[1:], params[1:])]
    done = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids], llm.block_manager.stats.hit_tokens


def _check_same_tokens(path, size):
    want, want_hits = _greedy(LLM(path, tokenizer=_NoText(), **ENGINE))
    with LLM(path, tokenizer=_NoText(), tensor_parallel_size=size, **ENGINE) as llm:
        assert len(llm.runner.workers.procs) == size - 1
        got, hits = _greedy(llm)
    assert want_hits > 0 and hits == want_hits, f"prefix-cache hits: {hits} tokens, one process {want_hits}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: tensor parallel {size} gave {g}, one process {w}"
    assert _no_children()


def _save_hf(folder, kind):
    hf, _ = make_hf(kind)
    with torch.no_grad():  # sharper distributions: greedy choices with clear margins
        hf.lm_head.weight.mul_(4.0)
    hf.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.mark.parametrize("kind, size", [("llama", 2), ("gpt2", 2), ("llama", 4)])
def test_hf_greedy_tokens_match_one_process(tmp_path, kind, size):
    _check_same_tokens(_save_hf(tmp_path, kind), size)


def _llama_gguf(path, qtype, intermediate=128):
    """A llama (GQA 4:2, hidden 64) as a GGUF file of `qtype`; d_ff 128 splits into whole blocks of 32 at N=2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_to_gguf import write_gguf

    torch.manual_seed(21)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=intermediate,
                                      max_position_embeddings=128, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)
    write_gguf(hf, "llama", str(path), qtype)
    return str(path)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_greedy_tokens_match_one_process(tmp_path, qtype):
    path = _llama_gguf(tmp_path / "m.gguf", qtype)
    llm = LLM(path, tokenizer=_NoText(), **ENGINE)
    assert type(llm.model.blocks[0].mlp.down).__name__ == "GGUFLinear"  # the blocks stay quantized
    _check_same_tokens(path, 2)


# ---- errors --------------------------------------------------------------------------------------------------

def test_bad_sizes_fail_before_any_process_starts(tmp_path):
    path = _save_hf(tmp_path / "hf", "llama")  # 4 heads, 2 K/V heads, d_ff 96
    cases = [(0, ValueError, "tensor_parallel_size: must be >= 1"),
             (-2, ValueError, "tensor_parallel_size: must be >= 1"),
             ("2", TypeError, "tensor_parallel_size: expected an int"),
             (True, TypeError, "tensor_parallel_size: expected an int"),
             (3, ValueError, "n_head 4 does not divide by 3"),
             (8, ValueError, "8 ranks for 4 attention heads")]
    for size, error, message in cases:
        with pytest.raises(error, match=message):
            LLM(path, tokenizer=_NoText(), tensor_parallel_size=size)
    # d_ff 96 splits into 48 columns at N=2: not whole Q8_0 blocks of 32 for the row-parallel down projection
    gguf = _llama_gguf(tmp_path / "m.gguf", "Q8_0", intermediate=96)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.down \(Q8_0, K 96\) splits into 2 parts of 48"):
        LLM(gguf, tokenizer=_NoText(), tensor_parallel_size=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=96, num_hidden_layers=1, num_attention_heads=6,
                                 num_key_value_heads=3, intermediate_size=96)).save_pretrained(tmp_path / "kv3")
    with pytest.raises(ValueError, match="n_kv_head 3 must divide by 2 or divide it"):
        LLM(str(tmp_path / "kv3"), tokenizer=_NoText(), tensor_parallel_size=2)
    model = LLM(path, tokenizer=_NoText()).model
    with pytest.raises(NotImplementedError, match="model: with tensor_parallel_size > 1"):
        LLM(model, tokenizer=_NoText(), tensor_parallel_size=2)
    with pytest.raises(NotImplementedError, match="draft_model: not supported"):
        LLM(path, tokenizer=_NoText(), tensor_parallel_size=2, draft_model=path)
    assert _no_children()


def test_killed_worker_fails_the_step_and_close_leaves_no_process(tmp_path):
    path = _save_hf(tmp_path, "llama")
    llm = LLM(path, tokenizer=_NoText(), tensor_parallel_size=2, **ENGINE)
    pid = llm.runner.workers.procs[0].pid
    llm.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.step()
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="a tensor-parallel step failed") as info:
        for _ in range(40):
            llm.step()
    # The ring sees the worker's process gone: at once, not after its 60 s timeout.
    assert time.monotonic() - start < 20, f"took {time.monotonic() - start:.1f} s: {info.value}"
    assert "exited" in str(info.value), str(info.value)
    with pytest.raises(RuntimeError, match="workers have stopped"):
        llm.step()
    llm.close()
    assert not psutil.pid_exists(pid) and _no_children()


def test_close_ends_every_worker(tmp_path):
    path = _save_hf(tmp_path, "gpt2")
    llm = LLM(path, tokenizer=_NoText(), tensor_parallel_size=2, **ENGINE)
    pids = [p.pid for p in llm.runner.workers.procs]
    assert all(psutil.pid_exists(p) for p in pids)
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))
    llm.close()
    llm.close()  # twice is fine
    assert not any(psutil.pid_exists(p) for p in pids) and _no_children()


# ---- the step message ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("decode", [False, True])
def test_step_message_round_trip(decode):
    gen = torch.Generator().manual_seed(0)
    T, S = (3, 3) if decode else (7, 2)
    paged = PagedBatch(positions=torch.randint(0, 50, (T,), generator=gen),
                       slot_mapping=torch.randint(0, 400, (T,), generator=gen),
                       block_table=torch.randint(0, 100, (S, 5), generator=gen, dtype=torch.int32),
                       seq_lens=torch.randint(1, 20, (S,), generator=gen, dtype=torch.int32),
                       cu_seqlens_q=None if decode else torch.tensor([0, 4, 7], dtype=torch.int32),
                       max_seqlen_q=1 if decode else 4, logits_rows=torch.tensor([T - 1]))
    tokens = torch.randint(0, V, (T,), generator=gen)
    header, payload = pack_step(tokens, paged, [(3, 9), (4, 10)])
    assert payload.dtype == torch.int64 and len(payload) == payload_size(header)
    got_tokens, got, copies = unpack_step(header, payload, "cpu")
    assert torch.equal(got_tokens, tokens) and copies == [[3, 9], [4, 10]]
    for name in ("positions", "slot_mapping", "block_table", "seq_lens", "cu_seqlens_q"):
        a, b = getattr(got, name), getattr(paged, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype), name
    assert got.max_seqlen_q == paged.max_seqlen_q and got.logits_rows.numel() == 0


# ---- the server ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A llama GGUF file (F32) with a BPE tokenizer and a chat template, as the server tests use."""
    from serve_server import write_model

    path = str(tmp_path_factory.mktemp("tp") / "tiny.gguf")
    write_model(path)
    return path


def test_generate_flag(tiny_gguf, capsys):
    args = ["generate", "--model", tiny_gguf, "--prompt", "hello", "--prompt", "the sky", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos"]
    assert cli_main(args) == 0
    want = capsys.readouterr().out
    assert cli_main(args + ["--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == want and want.strip()
    assert cli_main(args + ["--tensor-parallel-size", "0"]) != 0
    assert "flashlm: error: tensor_parallel_size: must be >= 1" in capsys.readouterr().err
    assert _no_children()


def test_serve_flag_runs_a_request_over_two_ranks(tiny_gguf):
    path = tiny_gguf
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompt = "hello there"
    want = LLM(path).generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text
    server = subprocess.Popen([sys.executable, "-m", "flashlm", "serve", path, "--port", str(port),
                               "--tensor-parallel-size", "2", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        reply, deadline = None, time.monotonic() + 120
        while reply is None:
            assert server.poll() is None, f"the server exited: {server.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
                reply = json.load(urllib.request.urlopen(req, timeout=60))
            except OSError:
                time.sleep(0.5)
        workers = _child_processes(server.pid)
        assert len(workers) == 1, workers
        assert reply["choices"][0]["text"] == want
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
    assert not any(psutil.pid_exists(w.pid) for w in workers)
