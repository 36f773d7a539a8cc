"""flashlm serve through the official `openai` client: completions and chat, streaming and not, n > 1, stop
strings, seeds, logprobs (against transformers' float64 forward of the same weights), echo and prompt
logprobs, JSON mode and JSON schemas (validated with jsonschema), tokenize/detokenize, metrics, API keys, and
every kind of bad input answered with OpenAI's error object and a 4xx. Greedy results are compared with
LLM.generate on a second engine over the same file, token for token.
"""

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from compare import assert_close_to_reference  # noqa: E402
from serve_server import MODEL_NAME, RunningServer, write_model  # noqa: E402

from flashlm import LLM, SamplingParams  # noqa: E402

PROMPTS = ["the quick brown fox", "hello world", "lazy dog", "Über café naïve", "token model weight layer",
           "12345 3.14", "we'll see", "attention cache"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve") / "tiny.gguf")
    hf = write_model(path)
    return path, hf


@pytest.fixture(scope="module")
def server(model_file):
    with RunningServer(LLM(model_file[0], max_num_seqs=16)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(model_file):
    """A second engine over the same file: LLM.generate's results, the server's reference."""
    return LLM(model_file[0], max_num_seqs=16)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _token_ids(choice):
    return getattr(choice, "token_ids", None) or choice.model_extra["token_ids"]


def test_completion_matches_generate(client, reference):
    want = reference.generate(PROMPTS[0], greedy())[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert _token_ids(c) == want.token_ids and c.text == want.text and c.finish_reason == want.finish_reason
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL_NAME
    n_prompt = len(reference.tokenizer.encode(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(want.token_ids))
    assert r.usage.total_tokens == n_prompt + len(want.token_ids)


def test_completion_prompt_forms(client, reference):
    """Text, token ids, and a list of either: one choice per prompt, in order."""
    ids = reference.tokenizer.encode(PROMPTS[1])
    want = [o.outputs[0].text for o in reference.generate([PROMPTS[0], ids], greedy(6))]
    for prompt in ([PROMPTS[0], PROMPTS[1]], [reference.tokenizer.encode(PROMPTS[0]), ids]):
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == want
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == want[1]


def test_completion_stream(client, reference):
    want = reference.generate(PROMPTS[2], greedy(16))[0].outputs[0]
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({ch.id for ch in chunks}) == 1


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_chat_matches_llm_chat(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    want = reference.chat(messages, greedy(12)).outputs[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    prompt = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt, add_special_tokens=False))
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_content_parts(client, reference):
    want = reference.chat([{"role": "user", "content": "hello world"}], greedy(6)).outputs[0].text
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}])
    assert r.choices[0].message.content == want


def test_n_and_seed(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=10, temperature=1.0, n=3, seed=1234,
              extra_body={"return_token_ids": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # each sample draws from its own stream (seed + i)
    assert a.usage.completion_tokens == sum(len(_token_ids(c)) for c in a.choices)
    other = client.completions.create(**dict(kw, seed=99))
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    streamed = list(client.completions.create(**kw, stream=True))
    for i in range(3):
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices[0].index == i) == a.choices[i].text
    chat = [client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                           seed=7, temperature=1.0, max_tokens=8) for _ in range(2)]
    assert [c.index for c in chat[0].choices] == [0, 1]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]


def test_stop_strings(client, reference):
    full = reference.generate(PROMPTS[4], greedy(24, ignore_eos=True))[0].outputs[0].text
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    cut = full[:full.find(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=24, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == cut  # nothing of the stop string was streamed


def _reference_logprobs(hf, ids):
    """log-softmax of transformers' forward over ids: float64 (the reference) and float32 (the baseline)."""
    out = []
    for dtype in (torch.float64, torch.float32):
        model = hf.to(dtype)
        with torch.no_grad():
            out.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].to(dtype), -1))
    hf.float()
    return out


def test_completion_logprobs(client, reference, model_file):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    c = r.choices[0]
    prompt = reference.tokenizer.encode(PROMPTS[0])
    out_ids = _token_ids(c)
    ref64, ref32 = _reference_logprobs(model_file[1], prompt + out_ids)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(out_ids) - 1)
    want64, want32 = ref64[rows, out_ids], ref32[rows, out_ids]
    got = torch.tensor(c.logprobs.token_logprobs, dtype=torch.float32)
    assert_close_to_reference(got, want64, want32, name="token_logprobs")
    assert len(c.logprobs.tokens) == len(out_ids) == len(c.logprobs.top_logprobs)
    for j, top in enumerate(c.logprobs.top_logprobs):
        assert c.logprobs.tokens[j] == f"token_id:{out_ids[j]}"
        best = torch.topk(ref64[rows[j]], 3).indices.tolist()
        assert [f"token_id:{i}" for i in best] == list(top)[:3]  # the top 3, most likely first
        got_top = torch.tensor(list(top.values())[:3], dtype=torch.float32)
        assert_close_to_reference(got_top, ref64[rows[j], best], ref32[rows[j], best], name="top_logprobs")
        assert list(top)[0] == c.logprobs.tokens[j]  # greedy took the best
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]


def test_echo_prompt_logprobs(client, reference, model_file):
    """echo + logprobs + max_tokens=0: the prompt's own logprobs, as lm-evaluation-harness asks for them."""
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[5], max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    c = r.choices[0]
    ids = reference.tokenizer.encode(PROMPTS[5])
    assert c.text == PROMPTS[5] and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.token_logprobs) == len(ids)
    ref64, ref32 = _reference_logprobs(model_file[1], ids)
    rows = torch.arange(len(ids) - 1)
    got = torch.tensor(c.logprobs.token_logprobs[1:], dtype=torch.float32)
    assert_close_to_reference(got, ref64[rows, ids[1:]], ref32[rows, ids[1:]], name="prompt logprobs")
    assert "".join(c.logprobs.tokens) == PROMPTS[5]


def test_chat_logprobs(client, reference):
    messages = [{"role": "user", "content": "hello"}]
    want = reference.chat(messages, greedy(6)).outputs[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}


def test_json_schema_and_json_mode(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "a color, as JSON"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=64, temperature=1.0, n=4,
                                       seed=3, response_format={"type": "json_schema", "json_schema": {
                                           "name": "color", "schema": SCHEMA, "strict": True}})
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=200, temperature=0.7, n=2,
                                       seed=5, response_format={"type": "json_object"})
    assert any(c.finish_reason == "stop" for c in r.choices)
    for c in r.choices:
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":  # a random model may write one long string: only a finished one must parse
            assert isinstance(json.loads(c.message.content), dict)
    # constrained and unconstrained requests in one batch
    async def mixed():
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0) as ac:
            fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": SCHEMA}}
            return await asyncio.gather(*(ac.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=64, seed=i, temperature=1.0,
                **({"response_format": fmt} if i % 2 else {})) for i in range(8)))
    for i, r in enumerate(asyncio.run(mixed())):
        if i % 2:
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_models_health_tokenize(server, reference):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[3]}).json()
    assert r["tokens"] == reference.tokenizer.encode(PROMPTS[3]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == reference.max_model_len
    r = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert r["prompt"] == reference.tokenizer.decode(reference.tokenizer.encode(PROMPTS[3]))
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    text = reference.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert r["tokens"] == reference.tokenizer.encode(text, add_special_tokens=False)


def test_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("flashlm:num_requests_running", "flashlm:num_requests_waiting", "flashlm:kv_cache_usage_perc",
                 "flashlm:prefix_cache_hit_rate", "flashlm:generation_tokens_total",
                 "flashlm:time_to_first_token_seconds_bucket", "flashlm:inter_token_latency_seconds_bucket"):
        assert name in text, name
    values = metric_values(text)
    assert values["flashlm:generation_tokens_total"] >= 3 and values["flashlm:time_to_first_token_seconds_count"] >= 1


def metric_values(text: str) -> dict:
    """Prometheus text -> {name: value} (labels dropped; one model per server)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


# ---- 16 concurrent clients ----------------------------------------------------------------------------------


def test_concurrent_greedy_matches_generate(server, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) + str(i) for i in range(16)]
    lengths = [4 + (i * 5) % 13 for i in range(16)]
    want = reference.generate(prompts, [greedy(n, ignore_eos=True) for n in lengths])

    async def one(client, prompt, n):
        r = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        return _token_ids(r.choices[0])

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    got = asyncio.run(run())
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w.outputs[0].token_ids, f"client {i}"


# ---- bad input ----------------------------------------------------------------------------------------------

LONG = "the quick brown fox " * 200
BAD = [
    # (name, path, body or raw bytes, status, param)
    ("malformed json", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("body not an object", "/v1/completions", [1, 2], 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("max_tokens of the wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("temperature of the wrong type", "/v1/completions", {"prompt": "x", "temperature": [1]}, 400, "temperature"),
    ("temperature below 0", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p above 1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("n of 0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("presence_penalty out of range", "/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400,
     "presence_penalty"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -2}, 400, "max_tokens"),
    ("logprobs above 20", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("empty stop string", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id past the vocabulary", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("prompt longer than the context", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("prompt and max_tokens past the context", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("too many choices", "/v1/completions", {"prompt": ["x"] * 64, "n": 64}, 400, "n"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ("messages empty", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message without a role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("image content", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("top_logprobs above 20", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ("unknown response_format", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "response_format": {"type": "yaml"}}, 400,
     "response_format.type"),
    ("json_schema without a schema", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                              "response_format": {"type": "json_schema",
                                                                                  "json_schema": {"name": "x"}}},
     400, "response_format"),
    ("detokenize out of range", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("tokenize without a prompt", "/tokenize", {}, 400, "prompt"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, client, name, path, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    # the server keeps serving
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_schema_that_cannot_compile(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices


def test_streamed_bad_input_is_an_error_response(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "stream": True, "temperature": -3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_api_key(model_file):
    with RunningServer(LLM(model_file[0], max_num_seqs=4), api_key="s3cret") as s:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key


def test_chat_without_template(tmp_path):
    path = str(tmp_path / "plain.gguf")
    write_model(path, chat_template=None)
    with RunningServer(LLM(path, max_num_seqs=4)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["param"] == "messages" and "chat template" in e.value.body["message"]
        assert c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices  # completions still work


# ---- the command -------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flashlm_serve_command(model_file):
    """`flashlm serve MODEL` as a user runs it: it serves the file under its name until stopped."""
    import subprocess
    import time

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashlm", "serve", model_file[0], "--port", str(port),
                             "--max-num-seqs", "4", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]  # the file's name
        assert c.completions.create(model="tiny", prompt="hello", max_tokens=3).usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv,message", [
    (["/no/such/model.gguf"], "no/such"),
    (["MODEL", "--port", "70000"], "port"),
    (["MODEL", "--max-num-seqs", "0"], "max_num_seqs"),
])
def test_flashlm_serve_bad_arguments(model_file, argv, message):
    import subprocess

    argv = [model_file[0] if a == "MODEL" else a for a in argv]
    r = subprocess.run([sys.executable, "-m", "flashlm", "serve", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("flashlm: error:") and message in r.stderr, r.stderr
