"""Training data: text in, batches of token ids out.

    data = prepare_data(["book.txt"], "runs/cache", vocab_size=4096)      # or prepare_data(None, ...): stdlib
    train = PackedBatches(data.train, seq_len=256, batch_size=8, seed=0, rank=rank, world_size=world)
    for step, (x, y) in zip(range(steps), train):                          # int64 [batch, seq_len] each
        ...
    ckpt["data"] = train.state_dict()        # later: train.load_state_dict(ckpt["data"]) resumes exactly

prepare_data reads and cleans the corpus (corpus.py), trains a byte-level BPE unless given a tokenizer.json
(tokenizer.py), holds out a fraction of the documents for validation and tokenizes everything once into two
memory-mapped files, train.bin and val.bin, each the concatenation of its documents with an EOS token after
each one, plus meta.json. All of it lives in a folder named by a hash of the cleaned documents, the
tokenizer and the split settings, so a second run with the same inputs opens the files and tokenizes nothing.

PackedBatches cuts a token array into sequences of seq_len + 1 tokens (inputs and the targets shifted by one;
consecutive sequences share one token so every token is a target once), shuffles them per epoch from
(seed, epoch), and gives rank r of world_size every world_size-th sequence of that order: the shards are
disjoint, equal in size and together the whole epoch (less at most world_size - 1 sequences).
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashlm.train.corpus import DEFAULT_SUFFIXES, hash_documents, load_corpus
from flashlm.train.tokenizer import eos_token_id, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def split_documents(n_docs: int, val_fraction: float, seed: int):
    """Document indices (train, val), each sorted. round(n * fraction) documents are held out, at least one
    when the fraction is positive and there are two or more documents; which ones depends only on seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_docs * val_fraction))
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(n_val, 1), n_docs - 1)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class TokenData:
    """Opened token files: `train` and `val` are read-only memmaps (uint16 or uint32)."""
    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict
    tokenizer_path: Path

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def _write_tokens(tok, docs, indices, eos_id, dtype, path, progress, desc, chunk=256):
    from tqdm import tqdm

    count = 0
    with open(path, "wb") as f:
        bar = tqdm(total=len(indices), desc=desc, unit="doc", disable=not progress)
        for start in range(0, len(indices), chunk):
            batch = [docs[i] for i in indices[start:start + chunk]]
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray(enc.ids + [eos_id], dtype=np.int64)
                f.write(ids.astype(dtype).tobytes())
                count += len(ids)
            bar.update(len(batch))
        bar.close()
        f.flush()
        os.fsync(f.fileno())
    return count


def _open_tokens(folder: Path, meta: dict, name: str) -> np.ndarray:
    path = folder / f"{name}.bin"
    dtype = np.dtype(_DTYPES[meta["dtype"]])
    n = int(meta[f"{name}_tokens"])
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes, meta.json says {n} {meta['dtype']} tokens")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    # One pass over the file so that an id past the vocabulary fails here, not inside an embedding lookup.
    top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, n, 1 << 24))
    if top >= int(meta["vocab_size"]):
        raise ValueError(f"{path}: token id {top} is outside the vocabulary of {meta['vocab_size']}")
    return tokens


def open_token_data(folder) -> TokenData:
    """Open a folder written by prepare_data; raises ValueError if it is incomplete or inconsistent."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no readable meta.json ({e})") from e
    if meta.get("format") != FORMAT_VERSION or meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{folder}/meta.json: unknown format {meta.get('format')} or dtype {meta.get('dtype')}")
    try:
        train = _open_tokens(folder, meta, "train")
        val = _open_tokens(folder, meta, "val")
        if not 0 <= int(meta["eos_id"]) < int(meta["vocab_size"]):
            raise ValueError(f"{folder}/meta.json: eos_id {meta['eos_id']} is outside the vocabulary")
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}: incomplete or inconsistent token files ({e!r})") from e
    return TokenData(folder, train, val, meta, folder / "tokenizer.json")


def prepare_data(sources=None, cache_dir="flashlm-data", *, tokenizer=None, vocab_size=8192,
                 val_fraction=0.05, seed=0, suffixes=DEFAULT_SUFFIXES, doc_separator=None,
                 max_bytes=None, eos_token=None, progress=True) -> TokenData:
    """Read, clean, tokenize and split `sources` (None: the stdlib's .py files) into `cache_dir`, or open
    the result of an earlier identical call. `tokenizer` is a tokenizer.json to reuse; without one a
    byte-level BPE of `vocab_size` is trained on the training documents (cached too)."""
    docs, stats = load_corpus(sources, suffixes, doc_separator, max_bytes)
    if val_fraction > 0 and len(docs) < 2:
        raise ValueError("val_fraction: the corpus is one document, so none can be held out; pass "
                         "doc_separator='\\n\\n' to make its paragraphs documents, or val_fraction=0")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    source_hash = hash_documents(docs)
    train_idx, val_idx = split_documents(len(docs), val_fraction, seed)

    if tokenizer is not None:
        tok_path = Path(tokenizer)
        tok = load_tokenizer(tok_path)
    else:
        key = hashlib.sha256(f"{source_hash} {vocab_size} {val_fraction} {seed}".encode()).hexdigest()[:16]
        tok_path = cache_dir / f"tokenizer-{key}.json"
        if tok_path.is_file():
            tok = load_tokenizer(tok_path)
        else:
            if progress:
                print(f"flashlm data: training a {vocab_size}-token byte-level BPE on {len(train_idx)} documents")
            tok = train_tokenizer((docs[i] for i in train_idx), vocab_size, progress=progress)
            tmp = tok_path.with_suffix(f".tmp{os.getpid()}")  # ranks preparing at once each write their own
            tok.save(str(tmp))
            os.replace(tmp, tok_path)
    tok_bytes = tok_path.read_bytes()
    tok_hash = hashlib.sha256(tok_bytes).hexdigest()
    eos_id = eos_token_id(tok, eos_token)
    vocab = tok.get_vocab_size(with_added_tokens=True)

    settings = {"format": FORMAT_VERSION, "source_hash": source_hash, "tokenizer_hash": tok_hash,
                "val_fraction": val_fraction, "seed": seed, "eos_id": eos_id}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / f"tokens-{key}"
    if folder.is_dir():
        try:
            data = open_token_data(folder)
            if progress:
                print(f"flashlm data: reusing {folder}")
            return data
        except ValueError:
            shutil.rmtree(folder, ignore_errors=True)  # a folder that does not check out: build it again

    if progress:
        print(f"flashlm data: {stats}")
    dtype = token_dtype(vocab)
    tmp = cache_dir / f"tokens-{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "tokenizer.json").write_bytes(tok_bytes)
    n_train = _write_tokens(tok, docs, train_idx, eos_id, dtype, tmp / "train.bin", progress, "tokenize train")
    n_val = _write_tokens(tok, docs, val_idx, eos_id, dtype, tmp / "val.bin", progress, "tokenize val")
    meta = dict(settings, vocab_size=vocab, dtype=np.dtype(dtype).name, eos_token=tok.id_to_token(eos_id),
                train_tokens=n_train, val_tokens=n_val, train_documents=len(train_idx),
                val_documents=len(val_idx), corpus=vars(stats))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, folder)  # the folder appears whole or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same folder first
    return open_token_data(folder)


class EpochBatches:
    """The endless iterator over epochs that PackedBatches and sft_data.SFTBatches share: subclasses give
    batch(epoch, index) and batches_per_epoch; epoch and index are the next batch's position."""

    def __len__(self):
        return self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch(self.epoch, self.index)  # (x, y), or more (a subclass's extra tensors)
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch


class PackedBatches(EpochBatches):
    """Batches (x, y) of int64 [batch_size, seq_len] from a 1-D token array, y being x shifted by one.

    Iterating never ends: after the last batch of an epoch comes the first batch of the next, reshuffled.
    The partial batch at the end of an epoch is dropped, so every rank takes the same number of steps.
    shuffle=False keeps the sequences in file order (for validation)."""

    def __init__(self, tokens, seq_len, batch_size, *, seed=0, rank=0, world_size=1, shuffle=True):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} world_size {world_size}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.num_sequences = max(len(tokens) - 1, 0) // seq_len
        self.batches_per_epoch = self.num_sequences // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"tokens: {len(tokens)} tokens make {self.num_sequences} sequences of {seq_len}, "
                             f"too few for one batch of {batch_size} on each of {world_size} ranks")
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self._order_epoch = None
        self._order = None

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sequence numbers for `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            n = self.num_sequences
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
            per_rank = n // self.world_size
            self._order = order[self.rank:per_rank * self.world_size:self.world_size]
            self._order_epoch = epoch
        return self._order

    def batch(self, epoch: int, index: int):
        """Batch `index` of `epoch` on this rank, independent of the iterator's position."""
        if not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"index must be in [0, {self.batches_per_epoch}), got {index}")
        seqs = self.shard(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s * L:s * L + L + 1], dtype=np.int64) for s in seqs])
        rows = torch.from_numpy(rows)  # [batch_size, seq_len + 1]
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict):
        """Continue from a saved position. The layout (seed, sizes, rank, world) must match: a position
        means nothing in a differently cut or shuffled epoch."""
        for name in ("seed", "seq_len", "batch_size", "rank", "world_size", "num_sequences"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"state_dict: {name} is {state.get(name)}, this loader has {getattr(self, name)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"state_dict: position (epoch {epoch}, index {index}) is out of range")
        self.epoch, self.index = epoch, index
