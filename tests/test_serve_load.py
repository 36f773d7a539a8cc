"""flashlm serve under load and cancellation, loopback only, bounded in count and time:
- clients that close their stream mid-way are aborted: no request stays in the engine and no KV block stays
  allocated, while the other clients finish with their one-at-a-time greedy results;
- 64 concurrent streaming clients with random prompt and output lengths on a KV cache too small for all of
  them (the scheduler preempts): every one completes with its one-at-a-time greedy result, no block leaks.
"""

import asyncio
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from serve_server import MODEL_NAME, RunningServer, write_model  # noqa: E402
from tokenizer_sources import WORDS  # noqa: E402

from flashlm import LLM, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve_load") / "tiny.gguf")
    write_model(path)
    return path


def one_at_a_time(path, prompts, lengths) -> list:
    """Each prompt's greedy tokens, generated alone."""
    llm = LLM(path, max_num_seqs=1)
    return [llm.generate(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
            for p, n in zip(prompts, lengths)]


async def stream_tokens(client, prompt, max_tokens, stop_after=None) -> list:
    """The token ids a streaming completion sends; stop_after: close the connection after that many chunks."""
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = []
    async for chunk in stream:
        ids += chunk.choices[0].model_extra["token_ids"]
        if stop_after is not None and len(ids) >= stop_after:
            await stream.close()
            break
    return ids


def run_clients(url, jobs) -> list:
    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(stream_tokens(client, *job) for job in jobs))
    return asyncio.run(run())


def test_disconnected_clients_are_aborted(model_path):
    prompts = [f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}" for i in range(12)]
    lengths = [120] * 12
    want = one_at_a_time(model_path, prompts, lengths)
    with RunningServer(LLM(model_path, max_num_seqs=16)) as server:
        # every other client leaves after 3 tokens, long before its 120
        jobs = [(p, n, 3 if i % 2 else None) for i, (p, n) in enumerate(zip(prompts, lengths))]
        got = run_clients(server.url, jobs)
        for i, (g, w) in enumerate(zip(got, want)):
            if i % 2:
                assert g[:3] == w[:3] and len(g) < len(w), f"client {i}"
            else:
                assert g == w, f"client {i}"
        state = server.wait_idle()
        assert not state["requests"] and state["running"] == state["waiting"] == 0 and state["blocks_used"] == 0
        text = httpx.get(server.url + "/metrics").text
        assert 'flashlm:num_requests_running{model_name="tiny-llama"} 0.0' in text
        assert 'flashlm:kv_cache_blocks_used{model_name="tiny-llama"} 0.0' in text
        aborted = [line for line in text.splitlines() if line.startswith("flashlm:requests_aborted_total")]
        assert aborted and float(aborted[0].rsplit(" ", 1)[1]) == 6


def test_64_streaming_clients_with_preemption(model_path):
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(64)]
    lengths = [rng.randint(1, 48) for _ in range(64)]
    want = one_at_a_time(model_path, prompts, lengths)
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB a block; 40 blocks hold ~640 tokens,
    # far fewer than 64 clients' prompts and outputs together
    llm = LLM(model_path, max_num_seqs=64, kv_cache_memory=40 * 8192, block_size=16)
    with RunningServer(llm) as server:
        got = run_clients(server.url, [(p, n) for p, n in zip(prompts, lengths)])
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"client {i}"
        state = server.wait_idle()
        assert not state["requests"] and state["blocks_used"] == 0
        assert state["preemptions"] > 0, "the cache was meant to be too small for every client at once"
