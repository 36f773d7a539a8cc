"""Tests for the training data pipeline: corpus cleaning, the byte-level BPE, the memory-mapped token files
and the packed, shuffled, sharded, resumable batches."""

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from flashlm.train.corpus import clean_text, load_corpus, stdlib_files
from flashlm.train.data import PackedBatches, open_token_data, prepare_data, split_documents, token_dtype
from flashlm.train.tokenizer import EOS_TOKEN, eos_token_id, load_tokenizer, train_tokenizer



def find_tinyshakespeare() -> Path:
    """$FLASHLM_TINYSHAKESPEARE, else shared/data/tinyshakespeare.txt beside the repository or above it."""
    if "FLASHLM_TINYSHAKESPEARE" in os.environ:
        return Path(os.environ["FLASHLM_TINYSHAKESPEARE"])
    repo = Path(__file__).resolve().parents[1]
    for parent in repo.parents:
        candidate = parent / "shared/data/tinyshakespeare.txt"
        if candidate.is_file():
            return candidate
    return repo.parent / "shared/data/tinyshakespeare.txt"


SHAKESPEARE = find_tinyshakespeare()


def random_docs(n, seed):
    """Documents of random words with accents, tabs, indentation and emoji: what a corpus throws at BPE."""
    rng = np.random.default_rng(seed)
    words = ["the", "def", "return", "café", "naïve", "\tindent", "    x = 1", "λ", "日本", "🙂", "a_b", "(", ")"]
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(rng.integers(1, 6))]
        docs.append(f"doc {i}\n" + "\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(random_docs(60, seed=1)):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"d{i:03d}.txt").write_text(doc, encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00\x01 not text")
    return root


@pytest.fixture(scope="module")
def data(corpus_dir, tmp_path_factory):
    return prepare_data(corpus_dir, tmp_path_factory.mktemp("cache"), vocab_size=400, val_fraction=0.2,
                        seed=3, progress=False)


def test_clean_text_normalises():
    decomposed = "cafe\u0301"  # e + combining acute: NFC makes it one code point
    text = f"\n\n  {decomposed}  \r\n\tdef f():\r\n        return 1   \r\n\r\n\rend \t\n\n"
    out = clean_text(text)
    assert out == "  caf\u00e9\n\tdef f():\n        return 1\n\n\nend"
    assert unicodedata.is_normalized("NFC", out)


def test_load_corpus_drops_empty_and_duplicates(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "b.txt").write_text("hello  \r\nworld")          # same text once cleaned
    (tmp_path / "c.md").write_text(" \n\t\n")                    # empty once cleaned
    (tmp_path / "d.py").write_text("x = 'caf\u0065\u0301'\n")
    (tmp_path / "e.py").write_text("x = 'caf\u00e9'")            # same as d.py after NFC
    (tmp_path / "f.csv").write_text("ignored: not a chosen suffix")
    (tmp_path / "g.txt").write_bytes(b"\xff\xfe bad utf-8")
    docs, stats = load_corpus(tmp_path)
    assert docs == ["hello\nworld", "x = 'caf\u00e9'"]
    assert (stats.files, stats.documents, stats.empty, stats.duplicates, stats.undecodable) == (6, 2, 1, 2, 1)
    with pytest.raises(ValueError, match="sources"):
        load_corpus(tmp_path / "missing")
    docs, _ = load_corpus(tmp_path / "a.txt", doc_separator="\n")
    assert docs == ["hello", "world"]


def test_stdlib_default_corpus():
    files = stdlib_files()
    assert files == sorted(files) and any(f.name == "os.py" for f in files)
    docs, stats = load_corpus(None, max_bytes=200_000)
    assert 0 < stats.files < len(files) and stats.documents > 0 and stats.chars > 0
    assert all(doc and doc == clean_text(doc) for doc in docs)


def test_tokenizer_round_trip(tmp_path):
    docs = random_docs(80, seed=2)
    tok = train_tokenizer(docs, vocab_size=350)
    # a small corpus may run out of pairs worth merging before the requested size
    assert 257 < tok.get_vocab_size() <= 350 and tok.token_to_id(EOS_TOKEN) == 0
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    unseen = "Ünïcödé never seen: Ω≈ç√ 🚀\n\t  indented\r\nend  "
    for text in docs[:10] + [unseen, ""]:
        ids = loaded.encode(text).ids
        assert ids == tok.encode(text).ids
        assert loaded.decode(ids) == text
    assert len(tok.encode(docs[0]).ids) < len(docs[0].encode("utf-8"))  # merges were learnt
    # ranks that each train on the same documents must get the same tokenizer (the cache relies on it)
    assert train_tokenizer(docs, vocab_size=350).to_str() == tok.to_str()
    assert eos_token_id(loaded) == 0
    with pytest.raises(ValueError, match="eos_token"):
        eos_token_id(loaded, "<nope>")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


def test_token_dtype():
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32


def test_token_files_match_direct_tokenization(corpus_dir, data):
    docs, _ = load_corpus(corpus_dir)
    tok = data.tokenizer()
    assert data.train.dtype == np.uint16 and 257 < data.vocab_size <= 400
    train_idx, val_idx = split_documents(len(docs), 0.2, seed=3)
    assert len(val_idx) == 12 and len(set(train_idx) | set(val_idx)) == len(docs)
    assert not set(train_idx) & set(val_idx)
    for array, idx in ((data.train, train_idx), (data.val, val_idx)):
        expected = [t for i in idx for t in tok.encode(docs[i]).ids + [data.eos_id]]
        assert np.array_equal(np.asarray(array), np.asarray(expected))
    # documents decode back from the file, split at EOS
    val = np.asarray(data.val).tolist()
    pieces, start = [], 0
    for k, t in enumerate(val):
        if t == data.eos_id:
            pieces.append(tok.decode(val[start:k]))
            start = k + 1
    assert pieces == [docs[i] for i in val_idx]
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train) and meta["val_documents"] == 12


def test_split_is_deterministic():
    a = split_documents(100, 0.1, seed=5)
    b = split_documents(100, 0.1, seed=5)
    c = split_documents(100, 0.1, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(split_documents(3, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(10, 1.0, seed=0)


def test_prepare_data_reuses_cache(corpus_dir, data, tmp_path):
    written = (data.path / "train.bin").stat().st_mtime_ns
    again = prepare_data(corpus_dir, data.path.parent, vocab_size=400, val_fraction=0.2, seed=3, progress=False)
    assert again.path == data.path and np.array_equal(again.train, data.train)
    assert (again.path / "train.bin").stat().st_mtime_ns == written  # opened, not written again
    other = prepare_data(corpus_dir, data.path.parent, vocab_size=400, val_fraction=0.2, seed=4, progress=False)
    with pytest.raises(ValueError, match="doc_separator"):
        prepare_data(next(corpus_dir.rglob("*.txt")), tmp_path, vocab_size=300, progress=False)
    assert other.path != data.path
    # reuse of a given tokenizer.json, and a damaged cache folder is rebuilt rather than trusted
    reuse = prepare_data(corpus_dir, tmp_path, tokenizer=data.tokenizer_path, val_fraction=0.2, seed=3,
                         progress=False)
    assert np.array_equal(reuse.train, data.train)
    with open(reuse.path / "train.bin", "ab") as f:
        f.write(b"\0\0")
    rebuilt = prepare_data(corpus_dir, tmp_path, tokenizer=data.tokenizer_path, val_fraction=0.2, seed=3,
                           progress=False)
    assert np.array_equal(rebuilt.train, data.train)
    # a token file that holds an id past the vocabulary is refused when opened
    bad = np.asarray(rebuilt.train).copy()
    bad[5] = rebuilt.vocab_size
    bad.tofile(rebuilt.path / "train.bin")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        open_token_data(rebuilt.path)
    (rebuilt.path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="meta.json"):
        open_token_data(rebuilt.path)


def make_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 60000, n).astype(np.uint16)


def test_packing_targets_are_shifted_inputs():
    tokens = make_tokens(10 * 17 + 1)
    loader = PackedBatches(tokens, seq_len=17, batch_size=3, shuffle=False)
    x, y = next(loader)
    assert x.dtype == torch.int64 and x.shape == (3, 17) and y.shape == (3, 17)
    assert torch.equal(x[:, 1:], y[:, :-1])
    full = torch.from_numpy(tokens.astype(np.int64))
    for row in range(3):
        assert torch.equal(x[row], full[row * 17:row * 17 + 17])
        assert torch.equal(y[row], full[row * 17 + 1:row * 17 + 18])
    assert len(loader) == 3  # 10 sequences, the partial batch dropped


def epoch_sequences(loader, epoch):
    """Sequence start tokens served in an epoch, read back from the batches."""
    return [tuple(row.tolist()) for i in range(len(loader)) for row in loader.batch(epoch, i)[0]]


def test_shuffle_is_deterministic():
    tokens = make_tokens(64 * 8 + 1)
    a = PackedBatches(tokens, 8, 4, seed=1)
    b = PackedBatches(tokens, 8, 4, seed=1)
    c = PackedBatches(tokens, 8, 4, seed=2)
    assert epoch_sequences(a, 0) == epoch_sequences(b, 0)
    assert epoch_sequences(a, 0) != epoch_sequences(c, 0)
    assert epoch_sequences(a, 0) != epoch_sequences(a, 1)
    assert sorted(epoch_sequences(a, 0)) == sorted(epoch_sequences(a, 1))  # same sequences, new order


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n_seq", [60, 61, 62])
def test_shards_partition_the_epoch(world_size, n_seq):
    tokens = make_tokens(n_seq * 5 + 1, seed=n_seq)
    single = PackedBatches(tokens, 5, 1, seed=7)
    shards = [PackedBatches(tokens, 5, 1, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    seqs = [set(s.shard(2).tolist()) for s in shards]
    assert all(len(s) == n_seq // world_size for s in seqs)
    assert len(set().union(*seqs)) == sum(len(s) for s in seqs)  # no overlap
    whole = set(single.shard(2).tolist())
    assert set().union(*seqs) <= whole and len(whole - set().union(*seqs)) == n_seq % world_size
    if n_seq % world_size == 0:
        assert set().union(*seqs) == whole
    # the same holds for what the batches contain
    union = set().union(*seqs)
    rows = [epoch_sequences(s, 2) for s in shards]
    single_rows = [r for r, s in zip(epoch_sequences(single, 2), single.shard(2).tolist()) if s in union]
    assert sorted(sum(rows, [])) == sorted(single_rows)
    assert len({len(r) for r in rows}) == 1


def test_resume_continues_exactly():
    tokens = make_tokens(23 * 9 + 1, seed=4)
    reference = PackedBatches(tokens, 9, 4, seed=11, rank=1, world_size=2)   # 11 sequences, 2 batches/epoch
    expected = [next(reference) for _ in range(9)]                           # runs over 4 epochs
    first = PackedBatches(tokens, 9, 4, seed=11, rank=1, world_size=2)
    got = [next(first) for _ in range(5)]
    state = first.state_dict()
    resumed = PackedBatches(tokens, 9, 4, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(4)]
    for (ex, ey), (gx, gy) in zip(expected, got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    with pytest.raises(ValueError, match="seed"):
        PackedBatches(tokens, 9, 4, seed=12, rank=1, world_size=2).load_state_dict(state)


def test_bad_arguments():
    tokens = make_tokens(100)
    with pytest.raises(ValueError, match="rank"):
        PackedBatches(tokens, 8, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="tokens"):
        PackedBatches(tokens, 50, 2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(tokens, 0, 2)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_tinyshakespeare(tmp_path):
    data = prepare_data(SHAKESPEARE, tmp_path, vocab_size=512, val_fraction=0.1, doc_separator="\n\n",
                        progress=False)
    assert data.meta["train_documents"] > 1000 and data.meta["val_documents"] > 100
    text = SHAKESPEARE.read_text(encoding="utf-8")
    # 512 merges-and-bytes give about 2 characters a token on English verse (1 would mean no merges)
    assert 1.5 < len(text) / (len(data.train) + len(data.val)) < 5.0
    loader = PackedBatches(data.train, 64, 8, seed=0)
    x, y = next(loader)
    assert int(x.max()) < data.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
