"""SFT data (rendering, loss masking, malformed records) and `flashlm finetune` (every method on a tiny model,
only the adapter trained, exact resume, errors)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashlm.cli import main as cli_main
from flashlm.io.tokenizer import Tokenizer
from flashlm.models import ModelConfig, Transformer
from flashlm.train.checkpoint import CheckpointManager
from flashlm.train.finetune import FinetuneConfig, FineTuner
from flashlm.train.sft_data import (DEFAULT_CHAT_TEMPLATE, IGNORE, SFTBatches, chat_segments, collate,
                                    encode_record, encode_records, read_sft_jsonl)
from flashlm.train.tokenizer import train_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def records(n=24):
    """A set a tiny model learns in a few steps: the assistant repeats the user's word twice."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append({"messages": [{"role": "system", "content": "echo"}, {"role": "user", "content": w},
                                 {"role": "assistant", "content": f"{w} {w}"}]})
    return out


@pytest.fixture(scope="module")
def backend():
    text = ["<|user|> <|assistant|> <|system|> echo " + " ".join(WORDS)] * 20
    return train_tokenizer(text, vocab_size=300)


@pytest.fixture(scope="module")
def tok(backend):
    return Tokenizer(backend, eos_token_ids=[0])


@pytest.fixture(scope="module")
def base_run(backend, tmp_path_factory):
    """A run folder as `flashlm train` writes it, of a tiny llama-family model."""
    folder = tmp_path_factory.mktemp("base") / "run"
    cfg = ModelConfig(arch="llama", vocab_size=backend.get_vocab_size(), n_layer=2, n_head=2, d_model=64,
                      seq_len=48)
    torch.manual_seed(0)
    model = Transformer(cfg)
    state = {"format": "flashlm-checkpoint-1", "model_config": cfg.to_dict(), "model": model.state_dict(),
             "tokenizer": backend.to_str(), "eos_token_id": 0, "step": 1}
    CheckpointManager(folder, keep=1).save(state, 1)
    return folder


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, recs in (("train.jsonl", records(24)), ("val.jsonl", records(8))):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder / "train.jsonl", folder / "val.jsonl"


# -- rendering and masking -------------------------------------------------------------------------------------

def test_default_template_renders_each_message_under_a_role_header(tok):
    from flashlm.train.sft_data import chat_tokenizer

    chat = chat_tokenizer(tok)
    assert chat.chat_template == DEFAULT_CHAT_TEMPLATE
    msgs = records(1)[0]["messages"]
    assert chat.apply_chat_template(msgs, add_generation_prompt=False) == \
        "<|system|>\necho\n<|user|>\nred\n<|assistant|>\nred red\n"
    segments = chat_segments(chat, msgs)
    assert "".join(t for t, _ in segments) == chat.apply_chat_template(msgs, add_generation_prompt=False)
    assert [t for t, answer in segments if answer] == ["red red\n"]


def test_model_template_segments_take_the_answer_and_its_end_of_turn(backend):
    chat = Tokenizer(backend, eos_token_ids=[0], chat_template=CHATML)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    segments = chat_segments(chat, msgs)
    assert [t for t, answer in segments if answer] == ["b<|im_end|>\n", "d<|im_end|>\n"]
    assert [t for t, answer in segments if not answer][1] == "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(backend):
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    chat = Tokenizer(backend, eos_token_ids=[0], chat_template=odd)
    with pytest.raises(ValueError, match=r"messages\[1\].*prefix"):
        chat_segments(chat, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_labels_are_the_answers_alone(tok):
    """Only the assistant's tokens (and the end-of-text after them) keep labels; records that differ in their
    prompts alone have the same labelled tokens."""
    a = {"messages": [{"role": "system", "content": "echo"}, {"role": "user", "content": "cat"},
                      {"role": "assistant", "content": "sun moon"}]}
    b = {"messages": [{"role": "user", "content": "dog tree blue"}, {"role": "assistant", "content": "sun moon"}]}
    from flashlm.train.sft_data import chat_tokenizer

    chat = chat_tokenizer(tok)
    ea, eb = encode_record(a, chat, 100), encode_record(b, chat, 100)
    kept_a = [t for t in ea.labels if t != IGNORE]
    assert kept_a == [t for t in eb.labels if t != IGNORE]
    assert kept_a[-1] == 0 and tok.decode(kept_a[:-1]) == "sun moon\n"
    n = len(kept_a)
    assert ea.labels[-n:] == ea.ids[-n:] and all(t == IGNORE for t in ea.labels[:-n])
    pc = encode_record({"prompt": "cat dog", "completion": " sun"}, tok, 100)
    assert [t for t in pc.labels if t != IGNORE] == tok.encode(" sun", add_special_tokens=False) + [0]
    assert pc.ids[:len(pc.ids) - sum(t != IGNORE for t in pc.labels)] == tok.encode("cat dog")


def test_truncation_keeps_the_first_tokens_and_drops_records_without_an_answer(tok):
    long_prompt = {"prompt": " ".join(WORDS * 10), "completion": " sun"}
    short = {"prompt": "cat", "completion": " " + " ".join(WORDS * 10)}
    kept, dropped = encode_records([long_prompt, short], tok, 16)
    assert dropped == 1 and len(kept) == 1
    full = encode_record(short, tok, 10_000)
    assert kept[0].ids == full.ids[:17] and kept[0].labels == full.labels[:17]
    with pytest.raises(ValueError, match="no record has an answer"):
        encode_records([long_prompt], tok, 16)


def test_masked_loss_equals_a_hand_computation(tok):
    from flashlm.train.sft_data import chat_tokenizer

    chat = chat_tokenizer(tok)
    examples = [encode_record(r, chat, 40) for r in records(3)]
    examples.append(encode_record({"prompt": "moon", "completion": " tree tree tree"}, tok, 40))
    x, y = collate(examples)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, seq_len=48)
    torch.manual_seed(0)
    model = Transformer(cfg)
    logits, loss = model(x, y)
    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = [-logp[b, t, y[b, t]] for b in range(y.shape[0]) for t in range(y.shape[1]) if y[b, t] != IGNORE]
    want = torch.stack(terms).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    # The targets of masked (prompt and padding) positions do not matter: any tokens there give the same loss
    # and the same gradient.
    model.zero_grad()
    loss.backward()
    grad = model.tok_emb.weight.grad.clone()
    other = torch.where(y == IGNORE, torch.randint_like(y, tok.vocab_size), y)
    _, unmasked = model(x, other)
    assert not torch.equal(unmasked, loss)
    y2 = torch.where(y == IGNORE, IGNORE, other)
    model.zero_grad()
    _, loss2 = model(x, y2)
    loss2.backward()
    assert torch.equal(loss2, loss) and torch.equal(model.tok_emb.weight.grad, grad)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(ce, loss)


def test_batches_pad_per_batch_and_resume_their_position(tok):
    examples, _ = encode_records([{"prompt": "cat " * (i + 1), "completion": " sun"} for i in range(7)], tok, 40)
    batches = SFTBatches(examples, 3, seed=5)
    assert len(batches) == 2
    seen = [next(batches) for _ in range(3)]
    x, y = seen[0]
    picked = np.random.default_rng([5, 0]).permutation(7)[:3]
    assert x.shape == y.shape == (3, max(len(examples[i].ids) for i in picked) - 1)
    for row, i in enumerate(picked):
        n = len(examples[i].ids) - 1
        assert x[row, :n].tolist() == examples[i].ids[:-1] and (x[row, n:] == 0).all()
        assert y[row, :n].tolist() == examples[i].labels[1:] and (y[row, n:] == IGNORE).all()
    again = SFTBatches(examples, 3, seed=5)
    again.load_state_dict(batches.state_dict())
    for a, b in zip(next(again), next(batches)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        SFTBatches(examples, 3, seed=6).load_state_dict(batches.state_dict())


@pytest.mark.parametrize("line, match", [
    ("{not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object"),
    ('{"messages": []}', r"line 2: messages: must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"line 2: messages\[0\]\.role"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"line 2: messages\[0\]\.content: must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"line 2: messages: has no assistant message"),
    ('{"prompt": "x"}', r"line 2: completion: missing"),
    ('{"prompt": 1, "completion": "x"}', r"line 2: prompt: must be a string"),
    ('{"prompt": "x", "completion": ""}', r"line 2: completion: is empty"),
    ('{"prompt": "x", "completion": "y", "messages": []}', r"line 2: completion: cannot be combined with messages"),
])
def test_malformed_lines_are_named(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n\n")
    with pytest.raises(ValueError, match=match):
        read_sft_jsonl(path)


def test_bad_bytes_and_deep_nesting_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        read_sft_jsonl(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match="line 3: JSON nested too deeply"):
        read_sft_jsonl(path)


def test_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_sft_jsonl(tmp_path / "e.jsonl")


# -- the fine-tuning loop --------------------------------------------------------------------------------------

def tuner(base_run, data_files, out_dir, method, resume=False, **kw):
    train, val = data_files
    values = dict(model=str(base_run), data=str(train), val_data=str(val), method=method, max_steps=12,
                  batch_size=4, eval_interval=6, ckpt_interval=6, eval_batches=2, warmup=2, lora_r=4,
                  num_virtual_tokens=4, out_dir=str(out_dir), progress=False, lr={"full": 3e-3, "prompt": 0.3, "prefix": 0.3}.get(method))
    values.update(kw)
    return FineTuner(FinetuneConfig(**values), resume=resume, log=lambda *a: None)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "full"])
def test_finetune_lowers_the_loss_and_trains_only_the_adapter(base_run, data_files, tmp_path, method):
    t = tuner(base_run, data_files, tmp_path / "run", method)
    before_loss = t.evaluate()
    base_before = {k: v.clone() for k, v in t.model.base.state_dict().items()}
    trainable = t.model.trainable()
    adapter_before = {k: v.detach().clone() for k, v in trainable.items()}
    optimised = {id(p) for g in t.dp.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainable.values()}
    metrics = t.train()
    assert metrics[-1]["val_loss"] < before_loss - 0.05
    changed = [k for k, v in trainable.items() if not torch.equal(v.detach(), adapter_before[k])]
    assert changed == list(trainable)
    if method == "full":
        return
    names = {"lora": ("lora_A", "lora_B"), "prompt": ("prompt_embeddings",), "prefix": ("prompt_embeddings",)}
    assert all(k.split(".")[-1] in names[method] for k in trainable)
    for k, v in t.model.base.state_dict().items():
        if k not in trainable:
            assert torch.equal(v, base_before[k]), k
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_finetune_resumes_exactly(base_run, data_files, tmp_path):
    full = tuner(base_run, data_files, tmp_path / "full", "lora").train()
    class Stop(Exception):
        pass

    def stop_at_6(trainer, record):  # after step 6's checkpoint, as a run killed there
        if trainer.step == 6:
            raise Stop

    with pytest.raises(Stop):
        tuner(base_run, data_files, tmp_path / "half", "lora").train(stop_at_6)
    resumed = tuner(base_run, data_files, tmp_path / "half", "lora", resume=True)
    assert resumed.step == 6
    rest = resumed.train()
    assert len(rest) == len(full) == 12
    assert [m["loss"] for m in rest] == [m["loss"] for m in full]
    assert [m.get("val_loss") for m in rest] == [m.get("val_loss") for m in full]
    assert torch.equal(resumed.model.base.blocks[1].attn.v.lora_B, tuner_weights(tmp_path / "full"))


def tuner_weights(run):
    from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run))["adapter"]["blocks.1.attn.v.lora_B"]


def test_lora_run_folder_runs_in_the_runtime_merged(base_run, data_files, tmp_path):
    """A lora run on a float base holds the merged weights: the runtime's model equals the tuned one."""
    from flashlm.io import load_model

    t = tuner(base_run, data_files, tmp_path / "run", "lora", max_steps=3)
    t.train()
    x = torch.tensor([[5, 9, 12, 3]])
    want, _ = t.model.eval()(x)
    got, _ = load_model(tmp_path / "run").model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qlora_quantizes_the_base_and_trains_only_the_adapter(base_run, data_files, tmp_path):
    """The forward half (backward through int4 blocks is the quantized layers' own): int4 blocks, LoRA A and B
    the only trainable tensors and the only ones with optimiser state, a finite loss."""
    from flashlm.quant import Int4Linear

    t = tuner(base_run, data_files, tmp_path / "run", "qlora")
    lora = t.model.base.blocks[0].attn.q
    assert isinstance(lora.base, Int4Linear)
    assert set(k.split(".")[-1] for k in t.model.trainable()) == {"lora_A", "lora_B"}
    assert {id(p) for g in t.dp.param_groups for p in g["params"]} == {id(p) for p in t.model.trainable().values()}
    assert torch.isfinite(torch.tensor(t.evaluate()))


def test_full_finetune_refuses_a_quantized_base(base_run, data_files, tmp_path):
    from flashlm.train.finetune import attach_method, load_base

    loaded = load_base(str(base_run), "qlora")
    with pytest.raises(ValueError, match="full fine-tuning needs a float base"):
        attach_method(loaded.model, FinetuneConfig(method="full"))


# -- the command -----------------------------------------------------------------------------------------------

def test_finetune_command_end_to_end(base_run, data_files, tmp_path, capsys):
    train, val = data_files
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base_run), "--data", str(train), "--method", "prefix", "--max-steps", "2",
            "--batch-size", "4", "--num-virtual-tokens", "2", "--out-dir", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert (out / "latest").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert cli_main(["finetune", "--out-dir", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "prefix on" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--lora-r", "0"], "r: must be a positive integer"),
    (["--target", "q,nope"], "targets: unknown module name 'nope'"),
    (["--method", "prompt", "--num-virtual-tokens", "48"], "num_virtual_tokens"),
    (["--seq-len", "1"], "seq_len: must be an integer > 1"),
    (["--max-steps", "0"], "max_steps: must be a positive integer"),
    (["--data", "MISSING.jsonl"], "MISSING.jsonl"),
])
def test_bad_arguments_are_one_line_errors(base_run, data_files, tmp_path, capsys, extra, match):
    args = ["finetune", "--model", str(base_run), "--data", str(data_files[0]), "--out-dir", str(tmp_path / "r"),
            "--no-progress"] + extra
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: ") and match in err and "Traceback" not in err


def test_missing_base_says_how_to_make_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["finetune", "--no-progress"]) == 2
    assert "run `flashlm train` first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gguf_bases(backend, tmp_path_factory):
    from flashlm.train.export import export_gguf

    cfg = ModelConfig(arch="llama", vocab_size=backend.get_vocab_size(), n_layer=2, n_head=2, d_model=64,
                      seq_len=48)
    torch.manual_seed(0)
    model = Transformer(cfg)
    folder = tmp_path_factory.mktemp("gguf")
    paths = {}
    for t in ("F32", "Q8_0"):
        paths[t] = str(folder / f"{t}.gguf")
        export_gguf(model, cfg, backend.to_str(), paths[t], type=t)
    return paths


def test_lora_trains_on_a_float_gguf_base(gguf_bases, data_files, tmp_path):
    t = tuner(gguf_bases["F32"], data_files, tmp_path / "run", "lora", max_steps=2, eval_interval=2,
              ckpt_interval=2)
    assert t.train()[-1]["step"] == 2
    assert set(k.split(".")[-1] for k in t.model.trainable()) == {"lora_A", "lora_B"}


def test_qlora_on_a_gguf_base_keeps_its_blocks_and_file(gguf_bases, data_files, tmp_path):
    from pathlib import Path

    from flashlm.quant import GGUFLinear

    before = Path(gguf_bases["Q8_0"]).read_bytes()
    t = tuner(gguf_bases["Q8_0"], data_files, tmp_path / "run", "qlora")
    assert isinstance(t.model.base.blocks[0].attn.q.base, GGUFLinear)
    assert set(k.split(".")[-1] for k in t.model.trainable()) == {"lora_A", "lora_B"}
    assert torch.isfinite(torch.tensor(t.evaluate()))
    assert Path(gguf_bases["Q8_0"]).read_bytes() == before


@pytest.fixture(scope="module")
def hf_base(backend, tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=48, bos_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    backend.save(str(path / "tokenizer.json"))
    return str(path)


def test_hf_base_lora_steps_and_qlora_quantizes_to_int4(hf_base, data_files, tmp_path):
    from flashlm.quant import Int4Linear

    t = tuner(hf_base, data_files, tmp_path / "lora", "lora", max_steps=2, eval_interval=2, ckpt_interval=2)
    assert t.train()[-1]["step"] == 2
    q = tuner(hf_base, data_files, tmp_path / "qlora", "qlora", target="q,v,down")
    assert isinstance(q.model.base.blocks[1].mlp.down.base, Int4Linear)
    assert sorted({k.rsplit(".", 1)[0].split(".", 2)[2] for k in q.model.trainable()}) == \
        ["attn.q", "attn.v", "mlp.down"]


def test_the_default_chat_set_pairs_consecutive_corpus_lines(base_run, tmp_path):
    """Without --data: the base run's corpus (the standard library's sources for this checkpoint, which names
    none), each record a line and the line after it."""
    from flashlm.train.corpus import load_corpus
    from flashlm.train.finetune import default_chat_set

    train, val = default_chat_set(str(base_run), tmp_path)
    recs, val_recs = read_sft_jsonl(train), read_sft_jsonl(val)
    assert len(recs) == 512 and len(val_recs) == 32
    docs, _ = load_corpus(None, max_bytes=1 << 20)
    lines = {}
    for doc in docs:
        stripped = [line.strip() for line in doc.splitlines() if 8 <= len(line.strip()) <= 80]
        for a, b in zip(stripped, stripped[1:]):
            lines.setdefault(a, set()).add(b)
    for r in recs[:50] + val_recs:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert answer in lines[user]


def test_a_gguf_base_needs_data_and_its_checkpoints_hold_no_merged_copy(gguf_bases, data_files, tmp_path):
    from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint

    with pytest.raises(ValueError, match="data: needed for this base"):
        tuner(gguf_bases["F32"], data_files, tmp_path / "none", "lora", data=None, val_data=None)
    t = tuner(gguf_bases["F32"], data_files, tmp_path / "run", "lora", max_steps=1)
    t.train()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert "model" not in ckpt and set(ckpt["adapter"]) == set(t.model.trainable())


def test_qlora_trains_through_a_q4_k_gguf_base(backend, data_files, tmp_path):
    """QLoRA straight on Q4_K blocks: gradients reach every layer's adapters through the frozen quantized
    linears (their backward reads the blocks in place), the held-out loss falls well below the base's, and the
    file is untouched. The margin: the echo set is deterministic given the prompt, so a working adapter takes the
    answer tokens' loss far below the untuned base's (~ln(vocab)); 1 nat is a small fraction of that drop."""
    from pathlib import Path

    from flashlm.quant import GGUFLinear
    from flashlm.train.export import export_gguf

    cfg = ModelConfig(arch="llama", vocab_size=backend.get_vocab_size(), n_layer=2, n_head=2, d_model=256,
                      d_ff=256, seq_len=48)
    torch.manual_seed(0)
    path = tmp_path / "Q4_K_S.gguf"
    export_gguf(Transformer(cfg), cfg, backend.to_str(), str(path), type="Q4_K_S")
    before = path.read_bytes()
    t = tuner(str(path), data_files, tmp_path / "run", "qlora", max_steps=50, eval_interval=50, ckpt_interval=50,
              lr=3e-3, target="q,k,v,o,gate,up,down")
    layers = [m.base for m in t.model.base.modules() if isinstance(getattr(m, "base", None), GGUFLinear)]
    assert len(layers) == 14 and "Q4_K" in {lin.ggml_type for lin in layers}
    base_loss = t.evaluate()
    first_a = t.model.base.blocks[0].attn.q.lora_A.detach().clone()
    t.train()
    tuned_loss = t.evaluate()
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)
    assert not torch.equal(t.model.base.blocks[0].attn.q.lora_A.detach(), first_a)  # the first layer learned too
    assert path.read_bytes() == before
