"""flashlm.train.peft: LoRA, prompt tuning and prefix tuning, and adapters in HF PEFT's format.

Reference: HF `peft` on the transformers model that flashlm loads (a random-weight Llama with GQA): the same
adapter weights give the same logits and the same gradients of the adapter; adapters written by either load in
the other with the same logits.
"""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from compare import assert_close, assert_equal  # noqa: E402

from flashlm.io import load_hf  # noqa: E402
from flashlm.quant import GGUFLinear, Int4Linear, Int8Linear  # noqa: E402
from flashlm.train.optim import AdamW  # noqa: E402
from flashlm.train.peft import (LoRALinear, PrefixTuning, PromptTuning, apply_lora, load_peft,  # noqa: E402
                                lora_layers, merge_and_unload, merge_lora, save_peft, trainable_parameters,
                                unmerge_lora)

V, T = 160, 12
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}
TARGET_SETS = ["q,v", "q,k,v,o", "gate,up,down", "q,k,v,o,gate,up,down"]


def _make_hf(hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _make_hf().save_pretrained(path, safe_serialization=True)
    return path


def _hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()


def _fl(path, **kw):
    return load_hf(path, **kw).model


def _idx(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, T), generator=g), torch.randint(0, V, (batch, T), generator=g)


def _hf_targets(targets):
    return [HF_NAMES[t] for t in targets.split(",")]


def _peft_lora(hf, r, targets, alpha=16, rslora=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=_hf_targets(targets), lora_dropout=0.0,
                          use_rslora=rslora, task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, cfg)


def _pairs(peft_model, fl_model):
    """(peft's lora_A, lora_B modules, flashlm's LoRALinear) for each adapted layer, in the same order."""
    ours = lora_layers(fl_model)
    out = []
    for name, m in ours.items():
        _, i, block, leaf = name.split(".")
        parent = peft_model.base_model.model.model.layers[int(i)]
        layer = getattr(getattr(parent, "self_attn" if block == "attn" else "mlp"), HF_NAMES[leaf])
        out.append((layer.lora_A["default"], layer.lora_B["default"], m))
    assert out
    return out


def _randomize(pairs, seed=3):
    """B non-zero (the init's zero B hides A), the same values on both sides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b, m in pairs:
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
            m.lora_A.copy_(a.weight)
            m.lora_B.copy_(b.weight)


# ------------------------------------------------------------------------------------------------ LoRA

@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("targets", TARGET_SETS)
def test_lora_matches_peft(hf_dir, r, targets):
    rslora = targets == "q,v"  # one target set with rsLoRA's alpha / sqrt(r)
    hf = _hf(hf_dir)
    torch.manual_seed(5)
    pm = _peft_lora(hf, r, targets, rslora=rslora)
    model = _fl(hf_dir)
    torch.manual_seed(5)
    names = apply_lora(model, r=r, alpha=16, targets=targets, rslora=rslora)
    assert len(names) == 2 * len(targets.split(","))
    pairs = _pairs(pm, model)
    for a, b, m in pairs:  # one seed, PEFT's init: A Kaiming-uniform, B zero
        assert_equal(m.lora_A.detach(), a.weight.detach(), name="lora_A init")
        assert_equal(m.lora_B.detach(), torch.zeros_like(m.lora_B), name="lora_B init")
        assert m.scaling == (16 / r ** 0.5 if rslora else 16 / r)
    _randomize(pairs)
    idx, targets_ = _idx()
    logits = pm(input_ids=idx).logits
    F.cross_entropy(logits.view(-1, V), targets_.view(-1)).backward()
    ours, loss = model(idx, targets_)
    loss.backward()
    assert_close(ours, logits, atol=1e-5, name="logits")
    for a, b, m in pairs:
        assert_close(m.lora_A.grad, a.weight.grad, rtol_of_max=1e-4, name="grad A")
        assert_close(m.lora_B.grad, b.weight.grad, rtol_of_max=1e-4, name="grad B")


def test_only_adapters_train(hf_dir):
    model = _fl(hf_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets="q,v,down")
    params = trainable_parameters(model)
    assert len(params) == 2 * 3 * 2 and all(p is m.lora_A or p is m.lora_B for p in params
                                            for m in [_owner(model, p)])
    opt = AdamW(params, lr=1e-2)
    model.train()
    idx, targets = _idx()
    for _ in range(2):
        opt.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()
    after = model.state_dict()
    for key, value in before.items():  # the base's tensors, under their wrapped names where wrapped
        wrapped = key.replace(".attn.q.", ".attn.q.base.").replace(".attn.v.", ".attn.v.base.") \
            .replace(".mlp.down.", ".mlp.down.base.")
        assert_equal(after[wrapped], value, name=key)
    assert all(len(opt.state[p]) for p in params)
    assert any(m.lora_B.abs().max() > 0 for m in lora_layers(model).values())


def _owner(model, p):
    return next(m for m in lora_layers(model).values() if p is m.lora_A or p is m.lora_B)


def test_merge_unmerge(hf_dir):
    pm = _peft_lora(_hf(hf_dir), 8, "q,k,v,o,gate,up,down")
    model = _fl(hf_dir)
    apply_lora(model, r=8, alpha=16, targets="q,k,v,o,gate,up,down")
    pairs = _pairs(pm, model)
    _randomize(pairs)
    idx, _ = _idx()
    with torch.no_grad():
        unmerged = model(idx)[0]
        original = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
        merge_lora(model)
        merged = model(idx)[0]
        pm.merge_adapter()  # PEFT's merge: W + (B @ A) * scaling in the weight's dtype
        for name, m in lora_layers(model).items():
            assert m.merged
            _, i, block, leaf = name.split(".")
            hf_layer = getattr(getattr(pm.base_model.model.model.layers[int(i)],
                                       "self_attn" if block == "attn" else "mlp"), HF_NAMES[leaf])
            assert_equal(m.base.weight.detach(), hf_layer.base_layer.weight.detach(), name=f"{name} merged")
        assert_close(merged, unmerged, atol=1e-5, name="merged logits")
        unmerge_lora(model)
        for name, m in lora_layers(model).items():
            assert_equal(m.base.weight.detach(), original[name], name=f"{name} unmerged")
        assert_equal(model(idx)[0], unmerged, name="unmerged logits")
        merge_and_unload(model)
        assert not lora_layers(model)
        assert_close(model(idx)[0], unmerged, atol=1e-5, name="merge_and_unload logits")


@pytest.mark.parametrize("kind", ["int8", "int4", "gguf_q8_0", "gguf_q4_k"])
def test_lora_on_quantized_base_forward(kind):
    """Base output plus the LoRA delta (float64 reference). Gradients through a quantized base are its own
    layer's backward, not LoRA's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    base = {"int8": lambda: Int8Linear.from_float(lin), "int4": lambda: Int4Linear.from_float(lin),
            "gguf_q8_0": lambda: GGUFLinear.from_float(lin, "Q8_0"),
            "gguf_q4_k": lambda: GGUFLinear.from_float(lin, "Q4_K")}[kind]()
    lora = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        got = lora(x)
        want = base(x).double() + (x.double() @ lora.lora_A.double().T @ lora.lora_B.double().T) * 2.0
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=kind)
    with pytest.raises(NotImplementedError, match="merge"):
        lora.merge()


def test_lora_on_int4_model_zero_b_is_base(hf_dir):
    model = _fl(hf_dir, quantize="int4")
    idx, _ = _idx()
    with torch.no_grad():
        base = model(idx)[0]
        apply_lora(model, r=2, alpha=4, targets="q,k,v,o,gate,up,down")
        assert_equal(model(idx)[0], base, name="zero-B logits")
        model.blocks[1].attn.q = LoRALinear(torch.nn.Linear(64, 64), 2, 4)  # one float base among int4 ones
        for fold in (merge_lora, merge_and_unload):
            with pytest.raises(NotImplementedError, match="merge: needs a float nn.Linear base, got Int4Linear"):
                fold(model)
            assert not any(m.merged for m in lora_layers(model).values())  # none merged, all still wrapped
            assert len(lora_layers(model)) == 14


# ------------------------------------------------------------------------------------------------ prompt, prefix

def _peft_prompt(hf, kind, P):
    cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    return peft.get_peft_model(hf, cls(task_type="CAUSAL_LM", num_virtual_tokens=P))


def _wrap(model, kind, P):
    return (PromptTuning if kind == "prompt" else PrefixTuning)(model, P)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("P", [1, 5])
def test_virtual_tokens_match_peft(hf_dir, kind, P):
    pm = _peft_prompt(_hf(hf_dir), kind, P)
    tuned = _wrap(_fl(hf_dir), kind, P)
    weight = pm.prompt_encoder["default"].embedding.weight
    assert weight.shape == tuned.prompt_embeddings.shape
    with torch.no_grad():
        tuned.prompt_embeddings.copy_(weight)
    idx, targets = _idx()
    logits = pm(input_ids=idx).logits[:, -T:]  # PEFT returns the virtual tokens' rows too (prompt tuning)
    F.cross_entropy(logits.reshape(-1, V), targets.view(-1)).backward()
    ours, loss = tuned(idx, targets)
    loss.backward()
    assert_close(ours, logits, atol=1e-5, name="logits")
    assert_close(tuned.prompt_embeddings.grad, weight.grad, rtol_of_max=1e-4, name="grad")


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_only_they_train(hf_dir, kind):
    tuned = _wrap(_fl(hf_dir), kind, 3)
    base = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    prompt = tuned.prompt_embeddings.detach().clone()
    params = trainable_parameters(tuned)
    assert params == [tuned.prompt_embeddings]
    opt = AdamW(params, lr=1e-2)
    tuned.train()
    idx, targets = _idx()
    opt.zero_grad()
    tuned(idx, targets)[1].backward()
    opt.step()
    for key, value in tuned.model.state_dict().items():
        assert_equal(value, base[key], name=key)
    assert not torch.equal(tuned.prompt_embeddings.detach(), prompt)


def test_prompt_text_init(hf_dir):
    model = _fl(hf_dir)
    tuned = PromptTuning(model, 5, init_token_ids=[7, 9])
    assert_equal(tuned.prompt_embeddings.detach(), model.tok_emb.weight[[7, 9, 7, 9, 7]].detach(), name="init")


def test_prefix_sdpa_matches_flashlm_attention(hf_dir):
    idx, _ = _idx()
    a = _wrap(_fl(hf_dir), "prefix", 4)
    b = _wrap(_fl(hf_dir, attn_impl="sdpa"), "prefix", 4)
    with torch.no_grad():
        b.prompt_embeddings.copy_(a.prompt_embeddings)
        assert_close(a(idx)[0], b(idx)[0], atol=1e-5, name="logits")


# ------------------------------------------------------------------------------------------------ PEFT format

def _lora_model(hf_dir, targets="q,k,v,o,gate,up,down", r=4):
    model = _fl(hf_dir)
    apply_lora(model, r=r, alpha=8, targets=targets)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("targets", ["q,v", "q,k,v,o,gate,up,down"])
def test_save_peft_loads_in_peft(hf_dir, tmp_path, targets):
    model = _lora_model(hf_dir, targets)
    save_peft(model, tmp_path, base_model_name_or_path=str(hf_dir))
    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path).eval()
    idx, _ = _idx()
    with torch.no_grad():
        assert_close(model(idx)[0], pm(input_ids=idx).logits, atol=1e-4, name="logits")


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_save_virtual_tokens_loads_in_peft(hf_dir, tmp_path, kind):
    tuned = _wrap(_fl(hf_dir), kind, 3)
    save_peft(tuned, tmp_path, base_model_name_or_path=str(hf_dir))
    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path).eval()
    idx, _ = _idx()
    with torch.no_grad():
        assert_close(tuned(idx)[0], pm(input_ids=idx).logits[:, -T:], atol=1e-4, name="logits")


@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix"])
def test_peft_save_loads_in_flashlm(hf_dir, tmp_path, kind):
    if kind == "lora":
        pm = _peft_lora(_hf(hf_dir), 4, "q,k,v,o,gate,up,down", rslora=True)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        pm = _peft_prompt(_hf(hf_dir), kind, 4)
    pm.save_pretrained(tmp_path)
    pm.eval()
    loaded = load_peft(_fl(hf_dir), tmp_path)
    idx, _ = _idx()
    with torch.no_grad():
        assert_close(loaded(idx)[0], pm(input_ids=idx).logits[:, -T:], atol=1e-4, name="logits")
    assert trainable_parameters(loaded)


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_lora_arguments(hf_dir):
    model = _fl(hf_dir)
    with pytest.raises(ValueError, match="targets: unknown module name 'qq'"):
        apply_lora(model, targets="q,qq")
    with pytest.raises(ValueError, match="targets: mlp.fc match no module"):
        apply_lora(model, targets="fc")
    for r in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="r: must be a positive integer"):
            apply_lora(_fl(hf_dir), r=r)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_fl(hf_dir), alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(_fl(hf_dir), dropout=1.0)
    with pytest.raises(TypeError, match="base"):
        LoRALinear(torch.nn.ReLU(), 2, 4)
    apply_lora(model, targets="q")
    with pytest.raises(ValueError, match="model: already has LoRA"):
        apply_lora(model, targets="v")
    for cls in (PromptTuning, PrefixTuning):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            cls(_fl(hf_dir), 0)
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(_fl(hf_dir), 2, init_token_ids=[V])


def test_adapter_base_mismatch(hf_dir, tmp_path):
    other = tmp_path / "other"
    _make_hf(hidden=32).save_pretrained(other, safe_serialization=True)
    small = _fl(other)
    apply_lora(small, r=4, alpha=8, targets="q,v")
    save_peft(small, tmp_path / "lora")
    target = _fl(hf_dir)
    with pytest.raises(ValueError, match=r"adapter: .*lora_A.weight has shape"):
        load_peft(target, tmp_path / "lora")
    assert not lora_layers(target)  # refused before the model was touched
    deep = tmp_path / "deep"
    _make_hf(layers=3).save_pretrained(deep, safe_serialization=True)
    for kind in ("lora", "prompt", "prefix"):
        if kind == "lora":
            adapted = _fl(deep)
            apply_lora(adapted, r=2, alpha=4, targets="q")
        else:
            adapted = _wrap(_fl(deep), kind, 2)
        save_peft(adapted, tmp_path / kind)
        with pytest.raises(ValueError, match="adapter: "):
            load_peft(_fl(hf_dir), tmp_path / kind)
    with pytest.raises(ValueError, match="model: has no adapter"):
        save_peft(_fl(hf_dir), tmp_path / "none")
    with pytest.raises(ValueError, match="path: "):
        load_peft(_fl(hf_dir), tmp_path / "missing")


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"), ("rank_pattern", {"q_proj": 2}),
                                          ("init_lora_weights", "pissa"), ("target_modules", "q_proj|v_proj"),
                                          ("peft_type", "IA3")])
def test_unsupported_peft_config(hf_dir, tmp_path, field, value):
    import json

    model = _lora_model(hf_dir, "q,v")
    save_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match=field):
        load_peft(_fl(hf_dir), tmp_path)


def test_malformed_adapter_files(hf_dir, tmp_path):
    import json

    save_peft(_lora_model(hf_dir, "q"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in [("r", 0), ("r", "4"), ("lora_alpha", -1), ("use_rslora", "yes"), ("lora_dropout", 2)]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=field.replace("lora_", "") if field != "use_rslora" else field):
            load_peft(_fl(hf_dir), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read"):
        load_peft(_fl(hf_dir), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft(_fl(hf_dir), tmp_path)


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_gradient_checkpointing_same_grads(hf_dir, kind):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        model = _fl(hf_dir)
        if kind == "lora":
            apply_lora(model, r=2, alpha=4, targets="q,k,v,o,gate,up,down")
            with torch.no_grad():
                for m in lora_layers(model).values():
                    m.lora_B.fill_(0.01)
            tuned = model
        else:
            tuned = _wrap(model, kind, 3)
        model.checkpointing = checkpointing
        tuned.train()
        idx, targets = _idx()
        tuned(idx, targets)[1].backward()
        grads.append([p.grad for p in trainable_parameters(tuned)])
    for a, b in zip(*grads):
        assert_close(b, a, rtol_of_max=1e-6, name="grad with checkpointing")


def test_lora_dropout_only_in_training():
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(8, 32)
    with torch.no_grad():
        want = lora.base(x) + x @ lora.lora_A.T @ lora.lora_B.T
        lora.eval()
        assert_close(lora(x), want, atol=1e-5, name="eval")
        lora.train()
        torch.manual_seed(1)
        dropped = lora(x)
        torch.manual_seed(1)
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5)  # the same draw as the layer's dropout
        assert_close(dropped, lora.base(x) + (x * mask) @ lora.lora_A.T @ lora.lora_B.T, atol=1e-5, name="train")


def test_bad_virtual_tokens_for_forward(hf_dir):
    model = _fl(hf_dir)
    idx, _ = _idx()
    d, L = model.cfg.d_model, model.cfg.n_layer
    with pytest.raises(ValueError, match="prompt: must be"):
        model(idx, prompt=torch.zeros(3, 2, d))
    with pytest.raises(ValueError, match="prompt: must be"):
        model(idx, prompt=torch.zeros(1, 2, d + 1))
    kv = torch.zeros(2, 3, model.cfg.n_kv_head, model.cfg.head_dim)
    with pytest.raises(ValueError, match="kv_prefix: expected 2 layers"):
        model(idx, kv_prefix=[(kv, kv)] * (L + 1))
    with pytest.raises(ValueError, match="kv_prefix: layer 1"):
        model(idx, kv_prefix=[(kv, kv), (kv, kv[:, :, :1])])
    with pytest.raises(ValueError, match="prompt: cannot be combined"):
        model(idx, prompt=torch.zeros(1, 2, d), kv_prefix=[(kv, kv)] * L)
    with pytest.raises(ValueError, match="less 60 virtual tokens"):
        model(idx, prompt=torch.zeros(1, 60, d))


def test_methods_on_gguf_base(tmp_path):
    """A GGUF file's model as it loads (GGUFLinear layers, a GGUFEmbedding): the forward of each method. The
    gradient through GGUFLinear is that layer's own backward."""
    pytest.importorskip("gguf")
    from flashlm.io import load_gguf
    from flashlm.io.random_model import write_random_llama_gguf

    path = str(tmp_path / "m.gguf")
    write_random_llama_gguf(path, d_model=64, d_ff=96, n_layer=2, vocab_size=320, n_head=4, ggml_type="Q4_0",
                            context_length=64)
    model = load_gguf(path, tokenizer=False).model
    idx, _ = _idx()
    with torch.no_grad():
        base = model(idx)[0]
        tuned = PromptTuning(model, 4, init_token_ids=[3, 5])
        assert_equal(tuned.prompt_embeddings, model.tok_emb(torch.tensor([3, 5, 3, 5])), name="init")
        assert tuned(idx)[0].shape == base.shape
        assert PrefixTuning(model, 2)(idx)[0].shape == base.shape
        apply_lora(model, r=2, alpha=4, targets="q,k,v,o,gate,up,down")
        assert all(type(m.base).__name__ == "GGUFLinear" for m in lora_layers(model).values())
        assert_equal(model(idx)[0], base, name="zero-B logits")
