"""Knowledge distillation (`flashlm distill`, train/distill.py): the model-level losses against float64 hand
computations, a student distilled from a GGUF Q8_0 teacher (trained here) against the same student trained on
labels only, the offline top-k logits file (round trip, hostile files), exact resume, vocabularies that differ."""

import dataclasses
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashlm.cli import main as cli_main
from flashlm.models import ModelConfig, Transformer
from flashlm.train.checkpoint import CheckpointManager
from flashlm.train.distill import (DistillConfig, DistillModel, Distiller, check_same_vocabulary, init_from_teacher,
                                   save_teacher_logits)
from flashlm.train.teacher_logits import _HEADER, open_teacher_logits
from flashlm.train.tokenizer import train_tokenizer

NOUNS = "cat dog bird fish cow horse sheep goat".split()
VERBS = "eats sees likes finds chases".split()
ADJECTIVES = "red big small old new green".split()


def paragraphs(n, seed=0):
    """Sentences of a small grammar: next-token distributions with real entropy (which noun, which verb)."""
    rng = random.Random(seed)
    return [" ".join(f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
                     for _ in range(rng.randint(2, 5))) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every model here has 32-64 columns: with more threads, torch's matmuls only wait on each other (30x slower
    on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    paras = paragraphs(600)
    (folder / "corpus.txt").write_text("\n\n".join(paras))
    train_tokenizer(paras, vocab_size=320).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def teacher_gguf(corpus):
    """A 2-layer llama trained on the corpus by `flashlm train`'s loop, exported to GGUF Q8_0."""
    from flashlm.train.config import TrainConfig
    from flashlm.train.export import export_checkpoint
    from flashlm.train.trainer import Trainer

    cfg = TrainConfig(arch="llama", n_layer=2, n_head=4, d_model=64, seq_len=64, data=[str(corpus / "corpus.txt")],
                      tokenizer=str(corpus / "tokenizer.json"), data_cache=str(corpus / "cache"), max_steps=150,
                      batch_size=8, lr=3e-3, min_lr=3e-4, warmup=10, eval_interval=150, ckpt_interval=150,
                      out_dir=str(corpus / "teacher"), sample_tokens=0, progress=False)
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.peak_flops = 1.0  # MFU's denominator: not looked at
    metrics = trainer.train()
    trainer.dp.close()
    assert metrics[-1]["val_loss"] < 1.5, metrics[-1]  # it learned the grammar (uniform would be ln 320 = 5.8)
    path = corpus / "teacher.gguf"
    export_checkpoint(str(corpus / "teacher"), gguf_path=str(path), type="Q8_0")
    return path


def config(corpus, teacher_path, out_dir, **kw):
    values = dict(teacher=str(teacher_path), data=[str(corpus / "corpus.txt")], data_cache=str(corpus / "cache"),
                  student_layers=1, student_dim=32, student_heads=2, seq_len=32, batch_size=4, max_steps=4,
                  lr=5e-3, warmup=2, eval_interval=1000, eval_batches=2, ckpt_interval=1000, out_dir=str(out_dir),
                  progress=False)
    values.update(kw)
    return DistillConfig(**values)


def distiller_of(dc, resume=False):
    d = Distiller(dc, resume=resume, log=lambda *a: None)
    d.peak_flops = 1.0  # MFU's denominator, not looked at here; measuring it takes seconds per run
    return d


# -- losses at the model level, against float64 hand computations --------------------------------------------

def tiny_pair(seed=0):
    torch.manual_seed(seed)
    teacher = Transformer(ModelConfig(arch="llama", vocab_size=50, n_layer=4, n_head=4, d_model=64, seq_len=16))
    student = Transformer(ModelConfig(arch="llama", vocab_size=50, n_layer=2, n_head=2, d_model=32, seq_len=16))
    for p in teacher.parameters():  # logits of a few nats, so the temperature matters
        p.data.mul_(4.0) if p.dim() >= 2 else None
    return teacher.eval().requires_grad_(False), student


def states_after(model, x, layer):
    """The residual stream after `layer` blocks, float64, by running the blocks one by one."""
    out = {}
    handle = model.blocks[layer - 1].register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    model(x)
    handle.remove()
    return out["h"].double()


@pytest.mark.parametrize("variant", ["soft-T2", "top-k", "reverse", "hidden"])
def test_loss_matches_float64_hand_computation(variant):
    """alpha * T^2 KL(p_t || p_s) at temperature T + (1 - alpha) * CE over the labels not ignored; top-k: the
    teacher's k logits renormalised, KL against the student's full softmax at those k; reverse: KL(p_s || p_t);
    hidden: plus the MSE of the projected student state against the teacher's."""
    teacher, student = tiny_pair()
    T, alpha, k = 2.0, 0.7, 5
    dc = DistillConfig(teacher="unused", temperature=T, alpha=alpha, top_k=k if variant == "top-k" else 0,
                       kl="reverse" if variant == "reverse" else "forward",
                       hidden_layers="1:2,2:4" if variant == "hidden" else "", hidden_weight=0.3)
    model = DistillModel(student, teacher, dc, teacher.cfg.to_dict()).train()
    torch.manual_seed(1)
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[0, :5] = -100
    y[2, 7] = -100
    _, loss = model(x, y)

    valid = (y != -100).reshape(-1)
    s = student(x)[0].double().reshape(-1, 50)
    t = teacher(x)[0].double().reshape(-1, 50)
    hard = F.cross_entropy(s, y.reshape(-1), ignore_index=-100, reduction="none")[valid]
    log_q = F.log_softmax(s / T, -1)
    if variant == "top-k":
        values, index = t.topk(k, -1)
        log_p = F.log_softmax(values / T, -1)
        soft = (log_p.exp() * (log_p - log_q.gather(1, index))).sum(-1)
    else:
        log_p = F.log_softmax(t / T, -1)
        a, b = (log_q, log_p) if variant == "reverse" else (log_p, log_q)
        soft = (a.exp() * (a - b)).sum(-1)
    want = (alpha * T * T * soft[valid] + (1 - alpha) * hard).mean()
    if variant == "hidden":
        proj = {key: m.weight.double() for key, m in model.projections.items()}
        mse = [((states_after(student, x, si) @ proj[f"{si}_{ti}"].T - states_after(teacher, x, ti)) ** 2).mean()
               for si, ti in ((1, 2), (2, 4))]
        want = want + 0.3 * sum(mse) / 2
    err = abs(loss.item() - want.item())
    assert err <= 1e-5 * abs(want.item()), f"{variant}: loss {loss.item()} vs float64 {want.item()} (error {err})"
    loss.backward()  # gradients reach the student and the projections, never the teacher
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_validation_loss_is_the_students_cross_entropy():
    teacher, student = tiny_pair()
    model = DistillModel(student, teacher, DistillConfig(teacher="unused"), teacher.cfg.to_dict()).eval()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    _, loss = model(x, y)
    want = F.cross_entropy(student(x)[0].double().reshape(-1, 50), y.reshape(-1))
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()


def test_init_from_teacher_takes_every_kth_layer_truncated():
    teacher, student = tiny_pair()
    assert init_from_teacher(student, teacher) == [0, 2]
    for i, j in ((0, 0), (1, 2)):
        got, src = student.blocks[i].attn.q.weight, teacher.blocks[j].attn.q.weight
        assert torch.equal(got, src[:got.shape[0], :got.shape[1]])
        assert torch.equal(student.blocks[i].mlp.down.weight,
                           teacher.blocks[j].mlp.down.weight[:student.cfg.d_model, :student.cfg.d_ff])
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight[:, :32])
    with pytest.raises(ValueError, match="init_from_teacher: the student has 4 layers, more than the teacher's 2"):
        init_from_teacher(teacher, student)


# -- distillation against labels only --------------------------------------------------------------------------

def kl_to_teacher(distiller) -> float:
    """Mean KL(teacher || student) per token over the held-out batches, float64, from each model's own logits."""
    teacher, student = distiller.teacher.model, distiller.model.student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(min(4, len(distiller.val_batches))):
            x, _ = distiller.val_batches.batch(0, i)
            log_p = F.log_softmax(teacher(x)[0].double(), -1)
            log_q = F.log_softmax(student(x)[0].double(), -1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += x.numel()
    return total / count


SEEDS = 5


def test_distilled_student_is_closer_to_the_teacher_than_one_trained_on_labels(corpus, teacher_gguf, tmp_path):
    """Five seeds; with each, the same 2-layer d_model 32 student (the teacher: 2 layers, d_model 64, GGUF Q8_0)
    trains twice for the same 200 steps on the same batches: on the teacher's soft targets (alpha 1) and on the
    labels (alpha 0). Its KL to the teacher on held-out text, KL_d and KL_l, is compared by the log of their ratio:
    every seed must have KL_d < KL_l, the geometric mean of KL_d / KL_l must be below 1/2, and the mean log-ratio
    must sit more than 3 standard errors below 0. Measured on the CPU: KL_d 0.012-0.044 against KL_l 0.034-0.173,
    a geometric mean ratio of 0.23 and a mean log-ratio 5.7 standard errors below 0."""
    kls = {}
    for seed in range(SEEDS):
        for alpha in (1.0, 0.0):
            dc = config(corpus, teacher_gguf, tmp_path / f"s{seed}a{alpha}", alpha=alpha, temperature=1.0,
                        student_layers=2, max_steps=200, warmup=5, seed=seed)
            distiller = distiller_of(dc)
            distiller.train()
            distiller.dp.close()
            kls[seed, alpha] = kl_to_teacher(distiller)
    distilled = np.array([kls[s, 1.0] for s in range(SEEDS)])
    labels = np.array([kls[s, 0.0] for s in range(SEEDS)])
    log_ratio = np.log(distilled / labels)
    stderr = log_ratio.std(ddof=1) / np.sqrt(SEEDS)
    message = (f"KL to the teacher, distilled {np.round(distilled, 4)} vs labels only {np.round(labels, 4)}: "
               f"geometric mean ratio {np.exp(log_ratio.mean()):.3f}, mean log-ratio {log_ratio.mean():.3f} "
               f"+/- {stderr:.3f}")
    assert (distilled < labels).all(), message
    assert np.exp(log_ratio.mean()) < 0.5, message
    assert log_ratio.mean() < -3 * stderr, message


# -- offline teacher logits -------------------------------------------------------------------------------------

def test_teacher_logits_file_round_trip_and_offline_training(corpus, teacher_gguf, tmp_path):
    from flashlm.io import load_model

    path = tmp_path / "teacher.kd"
    dc = config(corpus, teacher_gguf, tmp_path / "online", top_k=8, max_steps=2)
    n = save_teacher_logits(dc, str(path), progress=False)
    f = open_teacher_logits(path)
    assert (f.k, f.seq_len, f.vocab, f.positions) == (8, 32, 320, n)
    teacher = load_model(teacher_gguf).model
    x = torch.from_numpy(np.asarray(f.tokens[:64], dtype=np.int64)).view(2, 32)
    with torch.no_grad():
        logits = teacher(x)[0].reshape(64, -1)
    idx, val = f.topk(0, 64)
    assert torch.equal(val, logits.gather(1, idx).half().float())  # the stored values are the teacher's logits
    assert torch.equal(val, logits.topk(8, -1).values.half().float())  # and they are its top 8

    online = distiller_of(dc)
    offline = distiller_of(dataclasses.replace(dc, teacher=None, teacher_logits=str(path),
                                               out_dir=str(tmp_path / "offline")))
    a, b = online.train_step()["loss"], offline.train_step()["loss"]
    assert abs(a - b) <= 2e-3 * abs(a), (a, b)  # the same batches, the teacher's values rounded to fp16
    for d in (online, offline):
        d.dp.close()


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def logits_file(corpus, teacher_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("kd") / "teacher.kd"
    save_teacher_logits(config(corpus, teacher_gguf, path.parent / "unused", top_k=4), str(path), progress=False)
    return path


@pytest.mark.parametrize("damage,match", [
    (lambda p: corrupt(p, 0, b"XXXX"), "not a teacher logits file"),
    (lambda p: corrupt(p, 4, (9).to_bytes(4, "little")), "version 9"),
    (lambda p: corrupt(p, 12, (1000).to_bytes(4, "little")), "k 1000 outside"),
    (lambda p: corrupt(p, 8, (0).to_bytes(4, "little")), "vocab 0 outside"),
    (lambda p: corrupt(p, 16, (7).to_bytes(4, "little")), "not whole windows"),
    (lambda p: corrupt(p, 20, (1 << 60).to_bytes(8, "little")), "bytes, its header"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "bytes, its header"),
    (lambda p: p.write_bytes(p.read_bytes()[:10]), "shorter than"),
    (lambda p: corrupt(p, _HEADER.size, b"\xff\xfe"), "unreadable meta"),
])
def test_bad_teacher_logits_files_are_refused(logits_file, tmp_path, damage, match):
    path = tmp_path / "bad.kd"
    shutil.copy(logits_file, path)
    damage(path)
    with pytest.raises(ValueError, match=match):
        open_teacher_logits(path)


def test_bad_entries_of_a_teacher_logits_file_are_refused_when_read(logits_file, tmp_path):
    path = tmp_path / "bad.kd"
    shutil.copy(logits_file, path)
    k = open_teacher_logits(path).k
    corrupt(path, offset_of(path, "indices") + 4 * k * 3, (5000).to_bytes(4, "little"))  # position 3's first
    f = open_teacher_logits(path)
    f.topk(0, 3)
    with pytest.raises(ValueError, match="position 3 has an index outside"):
        f.topk(0, 8)
    shutil.copy(logits_file, path)
    corrupt(path, offset_of(path, "values") + 2 * k * 5, b"\x00\x7c")  # position 5's first value: +inf
    with pytest.raises(ValueError, match="position 5 .* not finite"):
        open_teacher_logits(path).topk(0, 8)
    shutil.copy(logits_file, path)
    corrupt(path, offset_of(path, "tokens"), (1 << 30).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="tokens hold ids outside"):
        open_teacher_logits(path)


def offset_of(path, name) -> int:
    from flashlm.train.teacher_logits import _layout

    _, _, vocab, k, _, positions, n_val, meta_bytes = _HEADER.unpack(path.read_bytes()[:_HEADER.size])
    return _layout(vocab, k, positions, n_val, meta_bytes)[name]


# -- resume, vocabularies, the command --------------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_run(corpus, teacher_gguf, tmp_path):
    kw = dict(max_steps=6, ckpt_interval=3, hidden_layers="1:2", student_layers=1)
    full = distiller_of(config(corpus, teacher_gguf, tmp_path / "full", **kw))
    want = [m["loss"] for m in full.train()]
    full.dp.close()

    class Stop(Exception):
        pass

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            raise Stop

    cut = config(corpus, teacher_gguf, tmp_path / "cut", **kw)
    first = distiller_of(cut)
    with pytest.raises(Stop):
        first.train(callback=stop_at_3)
    first.dp.close()
    second = distiller_of(cut, resume=True)
    got = [m["loss"] for m in second.train()]
    second.dp.close()
    assert got == want


def test_vocabularies_must_match(corpus, teacher_gguf, tmp_path):
    from tokenizers import Tokenizer

    mine = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    other = train_tokenizer(paragraphs(50, seed=3) + ["zebra quagga"], vocab_size=300)
    with pytest.raises(ValueError, match="student: its vocabulary has 300 tokens, the teacher's 320"):
        check_same_vocabulary(mine, other)
    swapped = train_tokenizer(paragraphs(600, seed=9), vocab_size=320)
    with pytest.raises(ValueError, match=r"student: token \d+ is '.*', the teacher's is '.*'"):
        check_same_vocabulary(mine, swapped)
    check_same_vocabulary(mine, Tokenizer.from_file(str(corpus / "tokenizer.json")))

    # an existing student with another tokenizer: refused before any training
    run = tmp_path / "student"
    cfg = ModelConfig(arch="llama", vocab_size=320, n_layer=1, n_head=2, d_model=32, seq_len=64)
    CheckpointManager(run, keep=1).save({"format": "flashlm-checkpoint-1", "model_config": cfg.to_dict(),
                                         "model": Transformer(cfg).state_dict(), "tokenizer": swapped.to_str(),
                                         "eos_token_id": 0, "step": 1}, 1)
    dc = config(corpus, teacher_gguf, tmp_path / "out", student_layers=None, student_dim=None, student_heads=None,
                student=str(run))
    with pytest.raises(ValueError, match="student: token"):
        distiller_of(dc)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), "alpha: must be in"),
    (dict(temperature=0.0), "temperature: must be"),
    (dict(kl="reverse", top_k=4), "kl: reverse KL"),
    (dict(kl="sideways"), "kl: must be one of"),
    (dict(hidden_layers="1-2"), "hidden_layers: expected"),
    (dict(teacher=None), "teacher: give"),
    (dict(top_k=-1), "top_k: must be"),
])
def test_bad_configurations_are_refused(corpus, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(corpus, "t.gguf", tmp_path, **kw)


def test_layers_past_either_model_are_refused(corpus, teacher_gguf, tmp_path):
    for pairs, match in (("2:1", "student layer 2 past its 1"), ("1:3", "teacher layer 3 past its 2")):
        with pytest.raises(ValueError, match=match):
            distiller_of(config(corpus, teacher_gguf, tmp_path / pairs.replace(":", "_"), hidden_layers=pairs))


def test_command_writes_a_run_folder_that_exports(corpus, teacher_gguf, tmp_path, capsys):
    from flashlm.io import load_model

    out = tmp_path / "run"
    assert cli_main(["distill", "--teacher", str(teacher_gguf), "--data", str(corpus / "corpus.txt"),
                     "--data-cache", str(corpus / "cache"), "--student-layers", "1", "--student-dim", "32",
                     "--student-heads", "2", "--seq-len", "32", "--max-steps", "2", "--temperature", "2",
                     "--alpha", "0.5", "--top-k", "16", "--out-dir", str(out), "--no-progress"]) == 0
    loaded = load_model(out)
    assert loaded.config.n_layer == 1 and loaded.config.d_model == 32 and loaded.tokenizer.vocab_size == 320
    assert cli_main(["export", str(out), "--gguf", str(tmp_path / "s.gguf"), "--type", "Q8_0", "--quiet"]) == 0
    assert load_model(tmp_path / "s.gguf").config.n_layer == 1
    capsys.readouterr()
    assert cli_main(["distill", "--data", "x.txt", "--out-dir", str(tmp_path / "none")]) == 2
    assert "flashlm: error: teacher: give" in capsys.readouterr().err
    assert cli_main(["distill", "--teacher", str(tmp_path / "missing.gguf"), "--out-dir", str(tmp_path / "m")]) == 2
    assert "flashlm: error: teacher:" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_match_one_rank_of_twice_the_batch(corpus, teacher_gguf, tmp_path):
    """`flashlm distill` under torchrun's environment, 2 CPU processes of batch 2, against one process of batch 4:
    rank r takes sequences r, r+2, ... of the shuffled order, so each step both see the same 4 sequences, every
    rank's teacher the same logits, and the average of the ranks' mean gradients is the mean gradient (each rank
    counts as many tokens: none is ignored). The runs differ only in float32 summation order, as for the trainer's
    own data parallelism (tests/test_train_loop.py): the losses and the student's weights to 1e-5."""
    from test_train_loop import read_metrics, run_two_ranks
    from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint

    two = tmp_path / "two"
    logs = run_two_ranks(["distill", "--teacher", teacher_gguf, "--data", corpus / "corpus.txt", "--data-cache",
                          corpus / "cache", "--student-layers", 1, "--student-dim", 32, "--student-heads", 2,
                          "--seq-len", 32, "--batch-size", 2, "--max-steps", 3, "--lr", 5e-3, "--warmup", 2,
                          "--eval-interval", 1000, "--ckpt-interval", 3, "--temperature", 2, "--alpha", 0.5,
                          "--out-dir", two, "--no-progress"], timeout=300)
    assert "2 rank(s)" in logs[0], logs[0]  # the run was data parallel, not two runs side by side

    one = distiller_of(config(corpus, teacher_gguf, tmp_path / "one", batch_size=4, max_steps=3, ckpt_interval=3,
                              temperature=2.0, alpha=0.5))
    want = one.train()
    one.dp.close()
    got = read_metrics(two)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=1e-5)
    two_params = load_checkpoint(latest_checkpoint(two))["model"]
    one_params = load_checkpoint(latest_checkpoint(tmp_path / "one"))["model"]
    assert two_params.keys() == one_params.keys()
    for k, w in one_params.items():
        err = (two_params[k] - w).abs().max().item()
        assert err <= 1e-5 * max(1.0, w.abs().max().item()), f"{k}: max abs diff {err}"
