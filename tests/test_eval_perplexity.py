"""flashlm.eval.perplexity against the tools whose numbers users compare with:
- llama.cpp's llama-perplexity: llama.cpp itself (llama-cpp-python, logits of every position of each chunk)
  evaluates the chunks of the same GGUF file, and the test scores them with llama-perplexity's formula
  (second half of each chunk, BOS replacing its first token where the vocabulary adds one): ppl within 0.1%,
  with and without a BOS token;
- HF's sliding-window recipe (transformers' docs) on the HF model: labels -100 outside each window's new
  tokens, the model's own loss; ppl within 1e-4 relative;
- lm-eval's loglikelihood_rolling: lm-eval's own window functions, each window's continuation summed from
  a transformers forward, 1e-4;
and the `flashlm eval MODEL --perplexity FILE` command, with its bad arguments.
"""

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_loaders import make_hf  # noqa: E402
from tokenizer_sources import corpus, train_bpe  # noqa: E402

from flashlm.cli import main as cli_main  # noqa: E402
from flashlm.eval.perplexity import perplexity, rolling_loglikelihood  # noqa: E402
from flashlm.runtime.engine import LLM  # noqa: E402

TEXT = "\n".join(corpus(60, seed=3))


def _hf_dir(folder, bos: bool):
    """A random llama directory with a byte-level BPE tokenizer; bos: its post-processor prepends
    <|endoftext|> (id 0), as Llama 3's prepends <|begin_of_text|>."""
    from tokenizers.processors import TemplateProcessing

    hf, _ = make_hf("llama")
    hf.save_pretrained(folder, safe_serialization=True)
    tok = train_bpe("gpt-2", vocab_size=300)
    if bos:
        tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    return hf


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def gguf_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    _hf_dir(folder, request.param)
    path = str(folder / "m.gguf")
    assert cli_main(["convert", str(folder), path, "--type", "F32", "--quiet"]) == 0
    return path, request.param


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return folder, _hf_dir(folder, False)


def llama_perplexity(path, text, ctx):
    """llama-perplexity's numbers, logits from llama.cpp: (ppl, its +/-, tokens scored, the token ids)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # float32 KV cache, as flashlm's on the CPU
    tokens = ref.tokenize(text.encode(), add_bos=True)  # add_special: BOS where the vocabulary adds it
    add_bos = tokens[0] == ref.token_bos() and ref.tokenize(b"a", add_bos=True)[0] == ref.token_bos()
    first, nll, nll2, count = ctx // 2, 0.0, 0.0, 0
    for i in range(len(tokens) // ctx):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if add_bos:
            chunk[0] = ref.token_bos()
        ref.reset()
        ref.eval(chunk)
        logits = np.array(ref.scores[:ctx], dtype=np.float64)
        for j in range(first, ctx - 1):  # process_logits: -log softmax(logits[j])[chunk[j + 1]]
            row = logits[j]
            v = np.log(np.exp(row - row.max()).sum()) + row.max() - row[chunk[j + 1]]
            nll, nll2, count = nll + v, nll2 + v * v, count + 1
    nll, nll2 = nll / count, nll2 / count
    ppl = math.exp(nll)
    return ppl, math.sqrt((nll2 - nll * nll) / (count - 1)) * ppl, count, tokens


@pytest.mark.parametrize("ctx", [16, 33])
def test_llama_cpp_method_matches_llama_perplexity(gguf_model, ctx):
    path, bos = gguf_model
    want, want_err, count, ref_tokens = llama_perplexity(path, TEXT, ctx)
    llm = LLM(path, max_model_len=ctx + 1, block_size=4)
    assert llm.tokenizer.encode(TEXT) == ref_tokens  # the same tokens, BOS included or not
    assert (ref_tokens[0] == 0) == bos
    r = perplexity(llm, TEXT, ctx_size=ctx, progress=False)
    assert r.tokens == count
    assert abs(r.ppl - want) <= 1e-3 * want, f"ppl {r.ppl} vs llama.cpp's formula {want}"
    assert abs(r.stderr - want_err) <= 1e-2 * want_err, f"stderr {r.stderr} vs {want_err}"
    assert abs(math.exp(r.nll) - r.ppl) <= 1e-9 * r.ppl


def hf_sliding_window(model, ids, max_length, stride):
    """transformers' docs recipe, each window's loss weighted by the labels it really scores."""
    ids = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.double().item()
        n = int((target_ids[:, 1:] != -100).sum())  # the labels left after the model's shift
        total, count = total + loss * n, count + n
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("ctx, stride", [(32, 16), (40, 7), (24, 24)])
def test_stride_method_matches_hf_recipe(hf_model, ctx, stride):
    folder, hf = hf_model
    llm = LLM(str(folder), max_model_len=ctx + 1, block_size=4)
    ids = llm.tokenizer.encode(TEXT)[:300]
    want, count = hf_sliding_window(hf.float().eval(), ids, ctx, stride)
    r = perplexity(llm, ids, ctx_size=ctx, method="stride", stride=stride, progress=False)
    assert r.tokens == count
    assert count == len(ids) - (1 if stride < ctx else -(-len(ids) // ctx))  # disjoint windows lose their first
    assert abs(r.ppl - want) <= 1e-4 * want, f"ppl {r.ppl} vs HF's recipe {want}"


@pytest.mark.parametrize("max_length, n", [(16, 70), (50, 30), (8, 8)])
def test_rolling_loglikelihood_matches_lm_eval_windows(hf_model, max_length, n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    folder, hf = hf_model
    llm = LLM(str(folder), max_model_len=max_length + 2, block_size=4)
    ids = llm.tokenizer.encode(TEXT)[:n]
    want = 0.0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(ids, 5, max_length, 1)):
        whole = (context + continuation)[-(max_length + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([whole[:-1]])).logits[0].double()
        logprobs = logits.log_softmax(-1)[-len(continuation):]
        want += logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item()
    got = rolling_loglikelihood(llm, ids, max_length, prefix_token=5)
    assert abs(got - want) <= 1e-4 * abs(want), f"{got} vs lm-eval's windows {want}"
    assert rolling_loglikelihood(llm, [], max_length, prefix_token=5) == 0.0


def test_batching_and_order_change_nothing(hf_model):
    """Windows batched many per step give what one window per step gives."""
    folder, _ = hf_model
    ids = LLM(str(folder), max_model_len=33, block_size=4).tokenizer.encode(TEXT)[:200]
    one = perplexity(LLM(str(folder), max_model_len=33, block_size=4, max_num_seqs=1), ids, 32, progress=False)
    many = perplexity(LLM(str(folder), max_model_len=33, block_size=4, max_num_seqs=8,
                          max_num_batched_tokens=64), ids, 32, progress=False)
    assert one.tokens == many.tokens
    assert abs(one.ppl - many.ppl) <= 1e-5 * one.ppl


def test_progress_bar_shows_the_running_estimate(hf_model, capsys):
    folder, _ = hf_model
    llm = LLM(str(folder), max_model_len=33, block_size=4)
    ids = llm.tokenizer.encode(TEXT)[:200]
    r = perplexity(llm, ids, 32, progress=True)
    err = capsys.readouterr().err
    assert f"ppl {r.ppl:.4f} +/- {r.stderr:.4f}" in err and f"{r.tokens}/{r.tokens}" in err, err
    assert r == perplexity(llm, ids, 32, progress=False)


def test_bad_arguments(hf_model):
    folder, _ = hf_model
    llm = LLM(str(folder), max_model_len=33, block_size=4)
    ids = llm.tokenizer.encode(TEXT)[:100]
    cases = [(dict(method="hf"), "method"), (dict(ctx_size=33), "ctx_size"), (dict(ctx_size=1), "ctx_size"),
             (dict(ctx_size=2.5), "ctx_size"), (dict(stride=4), "stride"),
             (dict(method="stride", stride=0), "stride"), (dict(method="stride", stride=40, ctx_size=32), "stride"),
             (dict(progress="yes"), "progress")]
    for kwargs, name in cases:
        with pytest.raises((ValueError, TypeError), match=f"^{name}"):
            perplexity(llm, ids, **kwargs)
    with pytest.raises(ValueError, match="^text_or_ids"):
        perplexity(llm, ids[:20], ctx_size=32, progress=False)  # no whole window
    with pytest.raises(ValueError, match="^text_or_ids"):
        perplexity(llm, [0, 10**6], ctx_size=32, progress=False)
    with pytest.raises(ValueError, match="^max_length"):
        rolling_loglikelihood(llm, ids, 32)  # windows of 33 tokens
    with pytest.raises(ValueError, match="^prefix_token"):
        rolling_loglikelihood(llm, ids, 8, prefix_token=-1)
    assert not llm.has_unfinished_requests()


def test_eval_command_prints_the_perplexity(gguf_model, tmp_path, capsys):
    """`flashlm eval MODEL --perplexity FILE`: the numbers perplexity() gives, in one line."""
    path, _ = gguf_model
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    assert cli_main(["eval", path, "--perplexity", str(text_file), "--ctx-size", "16", "--quiet"]) == 0
    want = perplexity(LLM(path, max_model_len=17, block_size=4), TEXT, 16, progress=False)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{text_file}: PPL = {want.ppl:.4f} +/- {want.stderr:.5f} (nll {want.nll:.6f}, "
                           f"{want.tokens} tokens scored, llama.cpp method, ctx 16)"), line
    args = ["eval", path, "--perplexity", str(text_file), "--method", "stride", "--ctx-size", "20", "--quiet"]
    assert cli_main(args) == 0
    want = perplexity(LLM(path, max_model_len=21, block_size=4), TEXT, 20, "stride", 10, progress=False)
    assert f"PPL = {want.ppl:.4f} " in capsys.readouterr().out


def test_eval_command_refuses_bad_arguments(gguf_model, tmp_path, capsys):
    path, _ = gguf_model
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    bad_utf8 = tmp_path / "b.txt"
    bad_utf8.write_bytes(b"ok \xff\xfe")
    short = tmp_path / "s.txt"
    short.write_text("a few words")
    ppl = ["eval", path, "--perplexity", str(text_file), "--quiet"]
    cases = [(["eval", path, "--quiet"], "eval: give one of"),
             (ppl + ["--data", str(text_file)], "eval: give one of"),
             (ppl + ["--ctx-size", "0"], "--ctx-size"), (ppl + ["--ctx-size", "128"], "--ctx-size"),
             (ppl + ["--stride", "4"], "--stride"), (ppl + ["--method", "stride", "--stride", "0"], "--stride"),
             (ppl + ["--method", "stride", "--ctx-size", "8", "--stride", "9"], "--stride"),
             (ppl + ["--max-num-seqs", "0"], "--max-num-seqs"),
             (["eval", path, "--perplexity", str(bad_utf8)], "--perplexity"),
             (["eval", path, "--perplexity", str(tmp_path / "missing.txt")], "No such file"),
             (["eval", str(tmp_path / "missing.gguf"), "--perplexity", str(text_file)], "path"),
             (["eval", path, "--perplexity", str(short), "--ctx-size", "100"], "text_or_ids")]  # not one window
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("flashlm: error: ") and message in err, (argv, err)
