"""`flashlm train/finetune --qat int8|int4 --qat-lsq`: learned steps in the run, its checkpoints and its export.

References: the QAT model rebuilt from the run's checkpoint by apply_qat(lsq=True) and a strict load_state_dict
(not the export path), against which the exported Int4Linear model's logits must be equal bit for bit; RTN's
steps (QATLinear.reset_steps on the same weights), which the trained steps must have left; an uninterrupted
run's last checkpoint, which a resumed run's must equal exactly.
"""

import pytest
import torch

from compare import assert_equal
from flashlm.cli import main
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear
from flashlm.quant.qat import QATLinear, apply_qat
from test_qat import corpus_bytes, logits_of


def train_args(folder, out_dir, steps, *extra):
    """`flashlm train` of the tiny preset (gpt2: K = 64 and 256) with --qat int4 --qat-lsq for `steps` steps."""
    text = folder / "text.txt"
    if not text.exists():
        text.write_bytes(bytes(corpus_bytes().tolist()))
    return ["train", "--preset", "tiny", "--data", str(text), "--data-cache", str(folder / "cache"), "--out-dir",
            str(out_dir), "--no-progress", "--sample-tokens", "0", "--max-steps", str(steps), "--eval-interval",
            str(steps), "--ckpt-interval", "1", "--qat", "int4", "--qat-lsq", *extra]


def last_checkpoint(out_dir):
    from flashlm.io.checkpoint import find_checkpoint

    return torch.load(find_checkpoint(str(out_dir)), weights_only=False)


def qat_model_of(ckpt):
    """The run's QAT model, rebuilt from its checkpoint directly."""
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    apply_qat(model, "int4", ckpt["train_config"]["qat_group_size"], lsq=True)
    model.load_state_dict(ckpt["model"])
    return model


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsq")
    assert main(train_args(folder, folder / "run", 3)) == 0
    return folder


def test_train_qat_lsq_exports_its_learned_steps(lsq_run, tmp_path, capsys):
    from flashlm.io import load_model

    ckpt = last_checkpoint(lsq_run / "run")
    assert ckpt["step"] == 3 and ckpt["train_config"]["qat_lsq"] is True
    model = qat_model_of(ckpt)
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    assert len(layers) == 2 * 6 and all(m.lsq and m.weight_step.dim() == 2 for m in layers)
    rtn = qat_model_of(ckpt)
    for m in rtn.modules():
        if isinstance(m, QATLinear):
            m.reset_steps()
    moved = [not torch.equal(a.weight_step, b.weight_step) for a, b in zip(
        layers, [m for m in rtn.modules() if isinstance(m, QATLinear)])]
    assert all(moved), "training left some layer's steps at RTN's"

    out = tmp_path / "int4.pt"
    assert main(["quantize", str(lsq_run / "run"), str(out), "--method", "qat"]) == 0
    assert "as trained with --qat int4" in capsys.readouterr().out
    exported = load_model(str(out))
    assert sum(isinstance(m, Int4Linear) for m in exported.model.modules()) == 2 * 6
    idx = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = logits_of(model, idx)
    assert_equal(logits_of(exported.model, idx), expected, name="exported vs LSQ QAT logits")
    assert not torch.equal(logits_of(rtn, idx), expected)  # the export used the learned steps, not RTN's

    floating = load_model(str(lsq_run / "run"))  # for eval/generate: the float model, steps left out
    assert not any(isinstance(m, QATLinear) for m in floating.model.modules())
    assert_equal(logits_of(floating.model, idx), logits_of(float_model_of(ckpt), idx), name="float model of the run")


def float_model_of(ckpt):
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.endswith(".weight_step")})
    return model


def test_resumed_qat_lsq_run_equals_the_uninterrupted_one(lsq_run, tmp_path):
    out = tmp_path / "resumed"
    assert main(train_args(lsq_run, out, 2)) == 0
    assert main(train_args(lsq_run, out, 3, "--resume")) == 0
    resumed, straight = last_checkpoint(out), last_checkpoint(lsq_run / "run")
    assert resumed["step"] == 3 and set(resumed["model"]) == set(straight["model"])
    assert any(k.endswith(".weight_step") for k in resumed["model"])
    for k in straight["model"]:
        assert_equal(resumed["model"][k], straight["model"][k], name=k)


def test_learned_steps_get_no_weight_decay():
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=1, n_head=2, d_model=64, d_ff=128,
                                    seq_len=16))
    apply_qat(model, "int4", 32, lsq=True)
    steps = {id(p) for n, p in model.named_parameters() if n.endswith("weight_step")}
    assert len(steps) == 7
    groups = model.param_groups(0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not steps & decayed
    matrices = {id(p) for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}
    assert len(matrices) > 7 and matrices <= decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_full_with_qat_lsq(lsq_run, tmp_path):
    from flashlm.io import load_model
    from flashlm.io.qat_export import export_qat
    from flashlm.train.finetune import FinetuneConfig, FineTuner

    data = tmp_path / "train.jsonl"
    rows = [(f"say {w}", f" {w} {w}") for w in ("red", "green", "blue", "black") * 6]
    data.write_text("".join(f'{{"prompt": "{p}", "completion": "{c}"}}\n' for p, c in rows))
    ft = FinetuneConfig(model=str(lsq_run / "run"), data=str(data), method="full", qat="int4", qat_lsq=True,
                        max_steps=2, batch_size=4, eval_interval=2, ckpt_interval=2, out_dir=str(tmp_path / "ft"),
                        progress=False)
    tuner = FineTuner(ft)
    steps = [n for n, _ in tuner.model.trainable().items() if n.endswith("weight_step")]
    assert len(steps) == 2 * 6
    assert not {id(tuner.model.trainable()[n]) for n in steps} & {
        id(p) for g in tuner.model.param_groups(0.1) if g["weight_decay"] > 0 for p in g["params"]}
    tuner.train()
    tuner.dp.close()
    export_qat(str(tmp_path / "ft"), str(tmp_path / "int4.pt"))
    exported = load_model(str(tmp_path / "int4.pt"))
    idx = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert_equal(logits_of(exported.model, idx), logits_of(tuner.model.base, idx), name="exported vs LSQ fine-tune")


def test_qat_lsq_settings_are_checked(lsq_run, tmp_path, capsys):
    from flashlm.io.qat_export import export_qat
    from flashlm.train.config import TrainConfig
    from flashlm.train.finetune import FinetuneConfig

    for qat in (None, "int4-asym", "Q4_0", "Q8_0", "Q4_K"):
        with pytest.raises(ValueError, match=f"^qat_lsq: learned steps go with qat int8 or int4, got qat {qat!r}"):
            TrainConfig(qat=qat, qat_lsq=True)
        with pytest.raises(ValueError, match="^qat_lsq: learned steps go with qat int8 or int4"):
            FinetuneConfig(method="full", qat=qat, qat_lsq=True)
    with pytest.raises(ValueError, match="^qat_lsq: expected True or False, got 'yes'"):
        TrainConfig(qat="int8", qat_lsq="yes")
    assert main(train_args(lsq_run, tmp_path / "bad", 1, "--qat", "int4-asym")) == 2
    assert "flashlm: error: qat_lsq: learned steps go with qat int8 or int4, got qat 'int4-asym'" \
        in capsys.readouterr().err
    assert main(["finetune", "--model", str(lsq_run / "run"), "--method", "full", "--qat", "Q4_0", "--qat-lsq",
                 "--out-dir", str(tmp_path / "ft")]) == 2
    assert "flashlm: error: qat_lsq: learned steps go with qat int8 or int4, got qat 'Q4_0'" \
        in capsys.readouterr().err

    # a checkpoint whose steps are missing, misshapen or not finite is refused by name
    state = last_checkpoint(lsq_run / "run")
    key = next(k for k in state["model"] if k.endswith(".weight_step"))
    good = state["model"][key]
    for bad, message in ((None, "got NoneType"), (good[:1], "expected float steps of shape"),
                         (good.to(torch.int32), "expected float steps"), (good * float("nan"), "not finite")):
        state["model"][key] = bad
        if bad is None:
            del state["model"][key]
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=f"^input: .*{key}: .*{message}"):
            export_qat(str(tmp_path / "bad.pt"), str(tmp_path / "y.pt"))
    state["model"][key] = good
    state["train_config"]["qat_lsq"] = "yes"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="^lsq: expected True or False"):
        export_qat(str(tmp_path / "bad.pt"), str(tmp_path / "y.pt"))
