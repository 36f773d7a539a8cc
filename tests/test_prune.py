"""Pruning (flashlm.train.prune, prune_scores, sparsity, `flashlm prune`).

Structured surgery is exact: the smaller model's logits equal the original's with the pruned heads' o
columns, the pruned channels' down columns and the dropped layers' outputs zeroed (which is all a removed
structure contributes). The pruned model goes out as GGUF (llama.cpp's greedy tokens equal flashlm's), HF
(transformers' logits) and a run folder (flashlm's loader). Scores against direct computations: magnitude
from the weights by loops, taylor against torch.autograd on an sdpa copy of the model. Masks: 2:4 keeps
exactly 2 of every 4 and survives an optimiser step; the trainer's L1 option moves each covered weight by
exactly lr * l1 * sign(w) more than a run without it (plain SGD)."""

import os
import re

import pytest
import torch
import torch.nn.functional as F

from compare import assert_close
from flashlm.cli import main as cli_main
from flashlm.io import load_model
from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.simple_generate import generate
from flashlm.train.export import export_gguf, export_hf
from flashlm.train.prune import (calibration_batches, check_drop_layers, float_model, kept_group_count, plan_pruning,
                                 prune_model, save_model)
from flashlm.train.prune_scores import magnitude_scores, taylor_scores
from flashlm.train.sparsity import SparsityMasks, l1_penalty
from flashlm.train.tokenizer import train_tokenizer
from test_export import llama_cpp_greedy, llama_cpp_model, unit_scale

VOCAB, SEQ = 317, 64
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
          "Sphinx of black quartz, judge my vow; 0123456789.", "How vexingly quick daft zebras jump."] * 8
# n_head 8 over 4 K/V groups (GQA 2:1) unless said otherwise; d_ff 96
MODELS = {"llama-gqa": dict(arch="llama", n_kv_head=4, rope_theta=500.0),
          "qwen2": dict(arch="qwen2", n_kv_head=2, tie_embeddings=False),
          "qwen3": dict(arch="qwen3", n_kv_head=4, head_dim=12),
          "gpt2": dict(arch="gpt2"),
          "gemma2": dict(arch="gemma2", n_layer=4, n_kv_head=4, head_dim=12, sliding_window=8, attn_softcap=20.0,
                         final_softcap=30.0)}
# what each model loses: (heads_keep, ffn_keep, drop_layers); gpt2 keeps its heads, gemma2 drops a local+global pair
PRUNE = {"llama-gqa": (0.5, 0.5, [1]), "qwen2": (0.5, 0.75, [2]), "qwen3": (0.25, 0.5, [0]),
         "gpt2": (1.0, 0.5, [1]), "gemma2": (0.5, 0.5, [2, 3])}


def make_model(name, seed=0, attn_impl="flashlm"):
    """A random model whose weights have unit-scale effects (std 1/sqrt(fan_in)), so that every head and
    channel moves the logits."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": VOCAB, "n_layer": 3, "n_head": 8, "d_model": 64, "d_ff": 96, "seq_len": SEQ,
                         **MODELS[name]})
    return cfg, unit_scale(Transformer(cfg, attn_impl=attn_impl).eval())


def zeroed_reference(model, plan):
    """The original model with everything the plan removes zeroed: o columns of pruned heads, down (proj)
    columns of pruned channels, and a dropped layer's o and down (and their biases): its branches add 0."""
    cfg = model.cfg
    ratio, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            out = block.mlp.proj if cfg.arch == "gpt2" else block.mlp.down
            dropped = i not in plan.layers
            for g in range(cfg.n_kv_head):
                if dropped or g not in plan.groups[i]:
                    block.attn.o.weight[:, g * ratio * hd:(g + 1) * ratio * hd] = 0
            for c in range(cfg.d_ff):
                if dropped or c not in plan.channels[i]:
                    out.weight[:, c] = 0
            if dropped:
                for linear in (block.attn.o, out):
                    if linear.bias is not None:
                        linear.bias.zero_()
    return model


def ids(n=2, t=24, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


# ------------------------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("score", ["magnitude", "activation", "taylor"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_logits_equal_zeroed_original(name, score):
    cfg, model = make_model(name)
    heads_keep, ffn_keep, drop = PRUNE[name]
    small, plan = prune_model(model, heads_keep, ffn_keep, drop, score, batches=[ids(2, 17, seed=5)])
    groups = kept_group_count(cfg, heads_keep)
    assert (small.cfg.n_layer, small.cfg.n_kv_head, small.cfg.d_ff) == (cfg.n_layer - len(drop), groups,
                                                                        round(ffn_keep * cfg.d_ff))
    assert small.cfg.n_head == groups * cfg.n_head // cfg.n_kv_head and small.cfg.head_dim == cfg.head_dim
    assert small.num_params() < model.num_params()
    x = ids()
    with torch.no_grad():
        original = model(x)[0]
        want = zeroed_reference(model, plan)(x)[0]
        got = small(x)[0]
    # pruning changed the logits (so equality below is not the trivial one), and the surgery is exact:
    # float32 sums over fewer terms, ~1e-6 apart
    assert (original - want).abs().max() > 0.05
    assert_close(got, want, atol=2e-5, rtol=1e-5, name=f"{name} {score}: pruned vs zeroed logits")


def test_plan_keeps_the_highest_scores():
    """A K/V group and MLP channels whose weights are zeroed score 0 by every score and are the ones pruned."""
    cfg, model = make_model("llama-gqa")
    ratio, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight[:, 1 * ratio * hd:2 * ratio * hd] = 0
            block.attn.q.weight[1 * ratio * hd:2 * ratio * hd] = 0
            block.attn.k.weight[hd:2 * hd] = 0
            block.attn.v.weight[hd:2 * hd] = 0
            for m in (block.mlp.gate, block.mlp.up):
                m.weight[:10] = 0
            block.mlp.down.weight[:, :10] = 0
    for score in ("magnitude", "activation", "taylor"):
        plan = plan_pruning(model, heads_keep=0.75, ffn_keep=86 / 96, score=score, batches=[ids(2, 17)])
        assert all(g == [0, 2, 3] for g in plan.groups), (score, plan.groups)
        assert all(c == list(range(10, 96)) for c in plan.channels), score


# -------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_scores_match_direct_computation(name, p):
    cfg, model = make_model(name)
    got = magnitude_scores(model, p)
    ratio, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    for i, block in enumerate(model.blocks):
        a = block.attn
        for g in range(cfg.n_kv_head):
            q_rows = slice(g * ratio * hd, (g + 1) * ratio * hd)
            kv_rows = slice(g * hd, (g + 1) * hd)
            parts = [a.q.weight[q_rows], a.k.weight[kv_rows], a.v.weight[kv_rows], a.o.weight[:, q_rows]]
            if cfg.qkv_bias:
                parts += [a.q.bias[q_rows], a.k.bias[kv_rows], a.v.bias[kv_rows]]
            want = torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in parts]), ord=p)
            assert_close(got["heads"][i, g], want, rtol=1e-12, name=f"layer {i} group {g}")
        m = block.mlp
        for c in range(0, cfg.d_ff, 7):
            parts = [m.fc.weight[c], m.fc.bias[c:c + 1], m.proj.weight[:, c]] if cfg.arch == "gpt2" else \
                [m.gate.weight[c], m.up.weight[c], m.down.weight[:, c]]
            want = torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in parts]), ord=p)
            assert_close(got["ffn"][i, c], want, rtol=1e-12, name=f"layer {i} channel {c}")


def test_taylor_scores_match_autograd():
    """taylor_scores (flashlm's attention and its backward) against |w * dL/dw| from torch.autograd on an
    sdpa copy of the model, summed by hand per K/V group and per channel over two batches."""
    cfg, model = make_model("qwen2")
    _, ref = make_model("qwen2", attn_impl="sdpa")
    batches = [ids(2, 17, seed=s) for s in (3, 4)]
    got = taylor_scores(model, batches)
    params = dict(ref.named_parameters())
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for batch in batches:
        logits = ref(batch[:, :-1])[0]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        for (k, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            acc[k] += (p.detach().double() * g.double()).abs()
    ratio, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    for i in range(cfg.n_layer):
        a = lambda n: acc[f"blocks.{i}.{n}"]  # noqa: E731
        for g in range(cfg.n_kv_head):
            q, kv = slice(g * ratio * hd, (g + 1) * ratio * hd), slice(g * hd, (g + 1) * hd)
            want = sum(float(t.sum()) for t in (a("attn.q.weight")[q], a("attn.q.bias")[q], a("attn.k.weight")[kv],
                                                a("attn.k.bias")[kv], a("attn.v.weight")[kv], a("attn.v.bias")[kv],
                                                a("attn.o.weight")[:, q]))
            assert_close(got["heads"][i, g], torch.tensor(want, dtype=torch.float64), rtol=2e-4,
                         name=f"layer {i} group {g} taylor")
        want = a("mlp.gate.weight").sum(1) + a("mlp.up.weight").sum(1) + a("mlp.down.weight").sum(0)
        assert_close(got["ffn"][i], want, rtol=2e-4, atol=1e-9, name=f"layer {i} channels taylor")


# ------------------------------------------------------------------------------------------- formats


def test_pruned_gguf_matches_llama_cpp_and_loads_everywhere(tokenizer, tmp_path):
    """A pruned llama (fewer GQA groups, head_dim 8 with d_model 64: HF's head_dim, llama.cpp's key_length)
    exported to GGUF F32:
    llama.cpp's greedy tokens equal flashlm's, and so do those of flashlm's engine serving the file; flashlm
    reads the file, the HF directory and the run folder back with the same logits, and transformers computes
    them too."""
    _, model = make_model("llama-gqa")
    small, _ = prune_model(model, *PRUNE["llama-gqa"])
    assert small.cfg.head_dim * small.cfg.n_head != small.cfg.d_model
    x = ids(1, 20, seed=7)
    with torch.no_grad():
        want = small(x)[0]
    tok = tokenizer.to_str()
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf"), ("run", tmp_path / "run")):
        save_model(small, str(out), fmt, tok, type="F32")
        loaded = load_model(out)
        shape = lambda c: (c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.d_ff)  # noqa: E731 (GGUF rounds eps to f32)
        assert shape(loaded.config) == shape(small.cfg), fmt
        with torch.no_grad():
            assert_close(loaded.model(x)[0], want, atol=2e-5, name=f"{fmt}: loaded pruned model's logits")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        assert_close(hf(x).logits, want, atol=2e-4, name="transformers on the pruned HF directory")

    llm = llama_cpp_model(tmp_path / "m.gguf")
    prompt = tokenizer.encode("The quick brown fox").ids
    greedy = generate(small, torch.tensor([prompt]), 24, temperature=0)[0].tolist()
    got, logits = llama_cpp_greedy(llm, prompt, greedy)
    with torch.no_grad():
        want_logits = small(torch.tensor([greedy[:-1]]))[0][0].numpy()
    assert_close(logits, want_logits, atol=3e-5, name="llama.cpp logits of the pruned model")
    assert got == greedy, f"llama.cpp greedy {got[len(prompt):]} vs flashlm {greedy[len(prompt):]}"

    engine = LLM(str(tmp_path / "m.gguf"), block_size=4)  # the serving runtime: paged cache, native decoder
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert engine.runner.native_decoder is not None
    assert out.outputs[0].token_ids == greedy[len(prompt):]


def test_pruned_qwen2_goes_to_hf_not_gguf(tokenizer, tmp_path):
    """llama.cpp's qwen2 has no head_dim of its own: a qwen2 with heads pruned is refused as GGUF, by export and
    by `flashlm convert` of its HF directory, and transformers computes the HF directory's logits."""
    _, model = make_model("qwen2")
    small, _ = prune_model(model, *PRUNE["qwen2"])
    with pytest.raises(ValueError, match="llama.cpp's qwen2 needs n_head \\* head_dim = d_model"):
        save_model(small, str(tmp_path / "m.gguf"), "gguf", tokenizer.to_str())
    save_model(small, str(tmp_path / "hf"), "hf", tokenizer.to_str())
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "c.gguf")]) != 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    x = ids(1, 20, seed=7)
    with torch.no_grad():
        assert_close(hf(x).logits, small(x)[0], atol=2e-4, name="transformers on the pruned qwen2")


def test_cli_prunes_a_gguf_file(tokenizer, tmp_path, capsys):
    """`flashlm prune` of a Q8_0 file (dequantized) with the taylor score on calibration text, to a run folder
    and to a GGUF file; the result loads and is the model the API cuts from the dequantized weights."""
    cfg, model = make_model("qwen3")
    src = tmp_path / "src.gguf"
    export_gguf(model, cfg, tokenizer.to_str(), src, type="Q8_0")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(CORPUS))
    args = [str(src), "--heads-keep", "0.5", "--ffn-keep", "0.5", "--drop-layers", "2", "--score", "taylor",
            "--calib-data", str(text), "--calib-samples", "4", "--calib-seq-len", "16"]
    assert cli_main(["prune", *args, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "n_layer 3 -> 2" in printed and "n_kv_head 4 -> 2" in printed and "d_ff 96 -> 48" in printed
    assert cli_main(["prune", *args, "--out", str(tmp_path / "small.gguf"), "--type", "F32"]) == 0
    run, gguf_model = load_model(tmp_path / "run"), load_model(tmp_path / "small.gguf")
    assert run.config == gguf_model.config and run.config.n_head == 4 and run.tokenizer is not None
    source = load_model(src)
    batches = calibration_batches(source.tokenizer, str(text), n_samples=4, seq_len=16)
    want, _ = prune_model(float_model(source), 0.5, 0.5, [2], "taylor", batches)
    x = ids(1, 12)
    with torch.no_grad():
        assert_close(run.model(x)[0], want(x)[0], atol=2e-5, name="the command's run folder vs the API's model")
        assert_close(gguf_model.model(x)[0], want(x)[0], atol=2e-5, name="the command's GGUF file vs the API's model")


@pytest.mark.parametrize("args, match", [
    (["--heads-keep", "0.3"], "heads_keep: 0.3 of 4 K/V groups is not a whole number"),
    (["--heads-keep", "1.5"], r"heads_keep: must be a fraction in \(0, 1\]"),
    (["--heads-keep", "0"], r"heads_keep: must be a fraction in \(0, 1\]"),
    (["--ffn-keep", "nan"], r"ffn_keep: must be a fraction in \(0, 1\]"),
    (["--drop-layers", "3"], r"drop_layers: layer 3 is not in \[0, 3\)"),
    (["--drop-layers", "-1"], r"drop_layers: layer -1 is not in \[0, 3\)"),
    (["--drop-layers", "0,0"], "drop_layers: a layer is named twice"),
    (["--drop-layers", "0,1,2"], "leaves no model"),
    (["--drop-layers", "a"], "--drop-layers: expected layer indices"),
    (["--score", "taylor"], "calib_data: the taylor score needs calibration text"),
    (["--score", "activation", "--calib-data", "missing.txt"], "calib_data: 'missing.txt' is not a file"),
    (["--calib-samples", "0", "--score", "taylor", "--calib-data", __file__], "calib_samples: must be a positive"),
    (["--format", "gguf", "--out", "."], "out: '.' is a folder, not a GGUF file"),
])
def test_cli_bad_input(args, match, tokenizer, tmp_path, capsys):
    cfg, model = make_model("llama-gqa")
    save_model(model, str(tmp_path / "src"), "run", tokenizer.to_str())
    assert cli_main(["prune", str(tmp_path / "src"), "--ffn-keep", "0.5", "--out", str(tmp_path / "src")]) != 0
    assert "is the model being pruned" in capsys.readouterr().err
    save_model(model, str(tmp_path / "other"), "run", tokenizer.to_str())
    assert cli_main(["prune", str(tmp_path / "src"), "--ffn-keep", "0.5", "--out", str(tmp_path / "other")]) != 0
    assert "holds checkpoints of another run" in capsys.readouterr().err
    ffn = [] if "--ffn-keep" in args else ["--ffn-keep", "0.5"]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    assert cli_main(["prune", str(tmp_path / "src"), *args, *ffn, *out]) != 0
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert not os.path.exists(tmp_path / "o")


def test_api_bad_input():
    cfg, model = make_model("gpt2")
    with pytest.raises(NotImplementedError, match="gpt2's head_dim"):
        prune_model(model, heads_keep=0.5)
    with pytest.raises(ValueError, match="ffn_keep"):
        prune_model(model, ffn_keep=True)
    with pytest.raises(ValueError, match="score: must be one of"):
        prune_model(model, ffn_keep=0.5, score="random")
    gcfg, _ = make_model("gemma2")
    with pytest.raises(ValueError, match="layer 2 would become layer 1"):
        check_drop_layers(gcfg, [1])
    assert check_drop_layers(gcfg, [0, 1]) == [2, 3]
    mqa = ModelConfig(arch="llama", n_head=8, n_kv_head=1, d_model=64)
    with pytest.raises(ValueError, match="heads_keep: 0.5 of 1 K/V groups"):
        kept_group_count(mqa, 0.5)


# ---------------------------------------------------------------------------------------------- masks


def test_semi_structured_masks_survive_a_step():
    from flashlm.train.optim import AdamW

    _, model = make_model("llama-gqa")
    model.train()
    masks = SparsityMasks.semi_structured(model, "blocks.*.mlp.*,blocks.*.attn.q.weight")
    assert len(masks.masks) == 3 * 4
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    masks.attach(opt)
    for _ in range(2):
        _, loss = model(ids(2, 16), ids(2, 16, seed=2))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for p in masks.masks:
        groups = (p.detach() == 0).reshape(p.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), "every 4 consecutive weights of a row hold exactly 2 zeros"
    assert masks.sparsity() == 0.5
    unmasked = model.blocks[0].attn.k.weight
    assert int((unmasked == 0).sum()) == 0


def test_magnitude_masks_zero_the_smallest():
    _, model = make_model("llama-gqa")
    w0 = model.blocks[0].mlp.up.weight.detach().clone()
    masks = SparsityMasks.magnitude(model, 0.3, "blocks.0.mlp.up.weight")
    w = model.blocks[0].mlp.up.weight.detach()
    zero = w == 0
    assert int(zero.sum()) == round(0.3 * w.numel())
    assert float(w0[zero].abs().max()) <= float(w0[~zero].abs().min())
    with pytest.raises(ValueError, match="pattern: 'nothing.*' matches no matrix"):
        SparsityMasks.magnitude(model, 0.3, "nothing.*")
    with pytest.raises(ValueError, match="sparsity"):
        SparsityMasks.magnitude(model, 1.0)
    assert masks.sparsity() == pytest.approx(0.3, abs=1e-3)


def test_l1_penalty_value():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([[0.5, -0.25]])
    assert float(l1_penalty([a, b], 0.1)) == pytest.approx(0.1 * 3.75)


def test_trainer_l1_option(tmp_path):
    """One plain-SGD step (constant lr, no clipping or decay) with --l1 c moves every weight matching
    --l1-params by exactly -lr * c * sign(w) more than the same step without it, and nothing else."""
    from flashlm.train.config import TrainConfig
    from flashlm.train.trainer import Trainer
    from test_train_loop import generated_text

    text = tmp_path / "t.txt"
    text.write_text(generated_text(20000))
    base = dict(data=[str(text)], data_cache=str(tmp_path / "cache"), progress=False, sample_tokens=0, max_steps=4,
                optimizer="sgd", lr=0.1, min_lr=0.1, warmup=0, grad_clip=0.0, weight_decay=0.0, vocab_size=300,
                arch="llama", seq_len=32, batch_size=2)
    runs = {}
    for l1 in (0.0, 0.01):
        cfg = TrainConfig.from_sources("tiny", overrides=dict(base, l1=l1, l1_params="blocks.*.mlp.*",
                                                              out_dir=str(tmp_path / f"run{l1}")))
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        trainer.train_step()
        runs[l1] = (before, dict(trainer.model.named_parameters()))
    (b0, p0), (b1, p1) = runs[0.0], runs[0.01]
    for name in p0:
        assert torch.equal(b0[name], b1[name])
        delta = p1[name].detach() - p0[name].detach()
        want = -0.1 * 0.01 * torch.sign(b0[name]) if ".mlp." in name and name.startswith("blocks.") else \
            torch.zeros_like(delta)
        assert_close(delta, want, atol=1e-6, name=f"{name}: the L1 step's difference")
    with pytest.raises(ValueError, match="l1: must be >= 0"):
        TrainConfig(l1=-1.0)
    bad = TrainConfig.from_sources("tiny", overrides=dict(base, l1=0.1, l1_params="nothing.*",
                                                          out_dir=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="l1_params|pattern"):
        Trainer(bad, log=lambda *a, **k: None)


@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_trainer_sparsity_option_survives_steps_and_resume(tmp_path, spec):
    """--sparsity keeps its masks through every step (AdamW with weight decay would move a masked weight off
    zero), saves them in the checkpoint, and a run resumed from step 2 takes them back: its losses and
    weights are the uninterrupted run's, and the masks are the saved ones even where the weights would now
    pick others."""
    import dataclasses
    import shutil

    from flashlm.train.config import TrainConfig
    from flashlm.train.trainer import Trainer
    from test_train_loop import generated_text

    text = tmp_path / "t.txt"
    text.write_text(generated_text(20000))
    cfg = TrainConfig.from_sources("tiny", overrides=dict(
        data=[str(text)], data_cache=str(tmp_path / "cache"), progress=False, sample_tokens=0, max_steps=4,
        ckpt_interval=2, eval_interval=2, vocab_size=300, arch="llama", seq_len=32, batch_size=2, lr=1e-2,
        weight_decay=0.1, sparsity=spec, sparsity_params="blocks.*.mlp.*", out_dir=str(tmp_path / "a")))
    quiet = dict(log=lambda *a, **k: None)
    trainer = Trainer(cfg, **quiet)
    masked = {name: p for name, p in trainer.model.named_parameters() if name.startswith("blocks.") and ".mlp." in name
              and p.dim() == 2}
    assert {id(p) for p in trainer.masks.masks} == {id(p) for p in masked.values()}
    want = {name: trainer.masks.masks[p].clone() for name, p in masked.items()}

    def check(step_trainer, *_):
        for name, p in masked.items():
            mask = want[name]
            assert int((p.detach()[~mask] != 0).sum()) == 0, f"{name}: a masked weight moved off zero"
            assert int((p.detach()[mask] == 0).sum()) == 0, f"{name}: a kept weight is zero"
            if spec == "2:4":
                groups = (p.detach() == 0).reshape(p.shape[0], -1, 4).sum(-1)
                assert bool((groups == 2).all()), f"{name}: not 2 zeros in every 4"
        assert step_trainer.masks.sparsity() == 0.5

    whole = []
    for _ in range(cfg.max_steps):
        whole.append(trainer.train_step())
        check(trainer)
        if trainer.step == 2:
            trainer.save_checkpoint()
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt-00000002.pt", tmp_path / "b")
    resumed = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), resume=True, **quiet)
    masked = {name: p for name, p in resumed.model.named_parameters() if name in masked}
    check(resumed)
    rest = [resumed.train_step() for _ in range(2)]
    check(resumed)
    assert [m["loss"] for m in rest] == [m["loss"] for m in whole[2:]]
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), f"{name}: the resumed run's weights differ"
    with pytest.raises(ValueError, match="sparsity: expected '2:4' or a fraction"):
        TrainConfig(sparsity="1:4")
    with pytest.raises(ValueError, match="sparsity: expected '2:4' or a fraction"):
        TrainConfig(sparsity="1.5")
    with pytest.raises(ValueError, match="sparsity: not available with zero_stage 3"):
        TrainConfig(sparsity="2:4", zero_stage=3)
    # The masks come from the checkpoint, not from the weights: other saved masks are the ones taken.
    state = torch.load(tmp_path / "b" / "ckpt-00000002.pt", weights_only=False)
    state["sparsity_masks"] = {name: ~mask for name, mask in state["sparsity_masks"].items()}
    resumed.load_state_dict(state)
    for name, p in masked.items():
        assert torch.equal(resumed.masks.masks[p], ~want[name]), f"{name}: the checkpoint's mask was not taken"
        assert int((p.detach()[want[name]] != 0).sum()) == 0, f"{name}: the checkpoint's mask was not applied"
    del state["sparsity_masks"][next(iter(state["sparsity_masks"]))]
    with pytest.raises(ValueError, match="checkpoint: its sparsity masks cover"):
        resumed.load_state_dict(state)
