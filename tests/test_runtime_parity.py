"""The runtime end to end against independent implementations of the same models:
- HF transformers: logits after a (chunked) prefill and after each of several decode steps through the
  engine's paged path, for llama (GQA, Llama 3 rope), qwen2, qwen3 (q/k norms, head_dim 24 in a 64-wide
  model), gemma2 (a sliding window of 5 on alternate layers, shorter than the 19-token prompt; soft-caps),
  gemma3 (the same window on six layers of seven, with their own rope base; q/k norms), phi3 (fused qkv and
  gate_up, the window of 5 on every layer), gpt2 and mistral (a window of 5 on every layer: the cache releases
  blocks outside it, held blocks stay bounded) directories;
- llama.cpp (llama-cpp-python, where it imports): `flashlm convert` writes F32, Q8_0 and Q4_0 files of such a
  model (llama, qwen3, phi3), flashlm's engine decodes 32 greedy tokens from them and llama.cpp the same tokens; the logits of
  every step stay close;
- the trainer's export: a checkpoint written out as GGUF decodes alike in the engine, in the training model
  and in llama.cpp.
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_loaders import V, make_hf  # noqa: E402
from tokenizer_sources import train_bpe  # noqa: E402

from flashlm.cli import main as cli_main  # noqa: E402
from flashlm.runtime.engine import LLM  # noqa: E402
from flashlm.runtime.sampling_params import SamplingParams  # noqa: E402
from flashlm.runtime.simple_generate import generate  # noqa: E402


def engine_trace(llm: LLM, prompt, steps: int, blocks_in_use=None, runner_forward=False):
    """Greedy decoding through the engine's scheduler and paged forward, one request: (tokens, the logits
    each sampled token was chosen from). blocks_in_use: a list that gets the cache blocks held at each step;
    runner_forward: the runner's forward (the native decoder where it applies), not the model's."""
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    logits_seen, tokens = [], []
    while llm.scheduler.has_work():
        batch = llm.scheduler.schedule()
        llm.runner.copy_blocks(batch.block_copies)
        ids, paged = llm.runner.prepare(batch, llm.block_manager)
        if blocks_in_use is not None:
            blocks_in_use.append(llm.block_manager.num_blocks - llm.block_manager.num_free_blocks)
        if runner_forward:
            logits = llm.runner.forward(ids, paged)
        else:
            logits = llm.model.forward_paged(ids, paged, llm.runner.kv_caches)
        nxt = logits.argmax(-1).tolist()
        if nxt:
            logits_seen.append(logits[0])
            tokens.append(nxt[0])
        llm.scheduler.update(batch, nxt)
    return tokens, torch.stack(logits_seen)


class _NoText:
    eos_token_ids = ()

    def decode(self, ids):
        return ""


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "mistral_swa"])
def test_engine_logits_match_transformers(tmp_path, kind):
    hf, _ = make_hf(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    # block size 4 and an 8-token budget: the 19-token prompt is prefilled in three chunks across blocks
    llm = LLM(str(tmp_path), tokenizer=_NoText(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, V, 19)]
    tokens, logits = engine_trace(llm, prompt, 8)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"{kind}: max abs logit difference {err} over {len(tokens)} steps"


def _hf_logits(hf, prompt, tokens):
    with torch.no_grad():
        return hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]


def test_mistral_window_frees_blocks_and_matches_transformers(tmp_path):
    """Mistral with a window of 5 (every layer) and blocks of 4: a 19-token prompt and 40 greedy steps hold at
    most ceil(5 / 4) + 1 blocks at every step (prefill chunks of 8 included) and give HF's logits; a second
    request with the same prompt hits the prompt blocks the first released, and still gives HF's logits."""
    hf, _ = make_hf("mistral_swa")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), tokenizer=_NoText(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    assert llm.block_manager.window == 5
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, V, 19)]
    in_use = []
    tokens, logits = engine_trace(llm, prompt, 40, in_use)
    assert max(in_use) <= 3, f"blocks held per step: {in_use}"
    err = (logits - _hf_logits(hf, prompt, tokens)).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"

    hits = llm.block_manager.stats.hit_tokens
    tokens, logits = engine_trace(llm, prompt, 6)
    # the lookup covers the first chunk (8 tokens, at most 7 cached): its first block, which the first request
    # released at its second chunk
    assert llm.block_manager.stats.hit_tokens - hits == 4
    err = (logits - _hf_logits(hf, prompt, tokens)).abs().max().item()
    assert err <= 1e-4, f"after a prefix hit: max abs logit difference {err}"


def test_mistral_window_gguf_steps_in_the_native_decoder(tmp_path):
    """A converted Mistral GGUF keeps its window (llama.attention.sliding_window), which reaches the native
    decoder's attention: the engine's paged steps there give the logits of the loaded model's own forward over
    the whole sequence (windowed attention, the same matmuls)."""
    from flashlm.gguf import GGUFFile

    hf, _ = make_hf("mistral_swa")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    train_bpe("gpt-2", vocab_size=300).save(str(tmp_path / "hf" / "tokenizer.json"))
    path = str(tmp_path / "m.gguf")
    assert cli_main(["convert", str(tmp_path / "hf"), path, "--type", "Q8_0", "--quiet"]) == 0
    with GGUFFile(path) as f:
        assert f.metadata["llama.attention.sliding_window"] == 5
    llm = LLM(path, block_size=4, max_num_seqs=1)
    assert llm.model.cfg.sliding_window == 5 and llm.runner.native_decoder() is not None
    prompt = [int(t) for t in np.random.default_rng(6).integers(0, V, 19)]
    tokens, logits = engine_trace(llm, prompt, 12, runner_forward=True)
    with torch.no_grad():
        ref = llm.model(torch.tensor([prompt + tokens]))[0][0, len(prompt) - 1:-1]
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"


@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3_tied"])
def hf_dir(tmp_path_factory, request):
    """A random llama (GQA, Llama 3 rope), qwen3 or phi3 (fused qkv and gate_up, no window: llama.cpp runs phi3
    without one) directory with a byte-level BPE tokenizer, as `flashlm convert` reads."""
    # (the folder's name becomes general.name; llama.cpp gives a model named "*phi3*" the attributes of Phi-3's
    # special tokens, which fails on a vocabulary without "</s>")
    folder = tmp_path_factory.mktemp("hf")
    hf, _ = make_hf(request.param)
    with torch.no_grad():  # sharper distributions: greedy choices with clear margins
        hf.lm_head.weight.mul_(4.0)
    hf.save_pretrained(folder, safe_serialization=True)
    train_bpe("gpt-2", vocab_size=300).save(str(folder / "tokenizer.json"))
    return folder, hf


@pytest.mark.parametrize("qtype, tol", [("F32", 1e-3), ("Q8_0", 0.05), ("Q4_0", 0.05)])
def test_converted_gguf_decodes_like_llama_cpp(hf_dir, tmp_path, qtype, tol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, _ = hf_dir
    path = str(tmp_path / f"m-{qtype}.gguf")
    assert cli_main(["convert", str(folder), path, "--type", qtype, "--quiet"]) == 0
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, V, 11)]
    tokens, logits = engine_trace(LLM(path, block_size=4, max_num_seqs=1), prompt, 32)

    # float32 KV cache (type 0): llama.cpp's default f16 cache would add its own rounding
    ref = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, verbose=False, n_threads=2, type_k=0, type_v=0,
                          logits_all=True)
    # llama.cpp decodes flashlm's greedy tokens, so that the logits of every step are compared: on their own,
    # the two runtimes part wherever two logits are closer than the kernels' rounding differences (this
    # random model has top-2 margins of ~0.005 against Q8_0's ~0.02), which says nothing about either.
    ref.eval(prompt)
    ref_logits = []
    for token in tokens:
        ref_logits.append(np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32))
        ref.eval([token])
    ref_logits = torch.from_numpy(np.stack(ref_logits))
    # Logits: F32 differs by float32 summation order only; Q8_0/Q4_0 both round activations to 8-bit blocks
    # as ggml does, in different kernels (bounds ~5x the measured differences).
    scale = ref_logits.abs().max().item()
    diff = (logits - ref_logits).abs()
    step = int(diff.amax(-1).argmax())
    assert diff.max().item() <= tol * scale, (f"{qtype}: max logit difference {diff.max().item():.3g} at step {step} "
                                              f"(logit scale {scale:.3g})")


def test_exported_checkpoint_runs_alike_in_the_runtime_and_llama_cpp(tmp_path):
    """The trainer's way out: a checkpoint exported to GGUF gives the same greedy tokens in flashlm's engine,
    in the training model itself and in llama.cpp (where it is installed)."""
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_checkpoint

    tok = train_bpe("gpt-2", vocab_size=300)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                      d_model=64, seq_len=64, tie_embeddings=False)
    torch.manual_seed(11)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # clear greedy margins
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "flashlm-checkpoint-1", "model_config": cfg.to_dict(), "model": model.state_dict(),
                "tokenizer": tok.to_str(), "eos_token_id": 0, "step": 1}, ckpt)
    path = str(tmp_path / "m.gguf")
    export_checkpoint(ckpt, gguf_path=path, type="F32")
    prompt = tok.encode("the quick brown fox").ids
    want = generate(model, torch.tensor([prompt]), 16, temperature=0)[0, len(prompt):].tolist()
    engine, _ = engine_trace(LLM(path, block_size=4), prompt, 16)
    assert engine == want
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = llama_cpp.Llama(model_path=path, n_ctx=64, verbose=False, n_threads=2, type_k=0, type_v=0)
    ref.eval(prompt)
    got = []
    for _ in range(16):
        logits = np.ctypeslib.as_array(ref._ctx.get_logits(), shape=(ref.n_vocab(),))
        got.append(int(logits.argmax()))
        ref.eval([got[-1]])
    assert got == want
