"""ModelRunner: owns the paged KV cache tensors and turns a scheduled step into one forward pass.

For each step it packs the new tokens of every scheduled sequence into one row, builds the PagedBatch
(positions, cache slots, block tables, sequence lengths, cu_seqlens_q), makes the block copies the block
manager asked for, runs the model and samples the sequences whose chunk reached their end. A sequence that
wants prompt logprobs gets the logits of every prompt position of its chunk too, turned into log-probabilities
of the prompt's next tokens (appended to seq.prompt_logprobs, each position once, so a recompute after
preemption adds nothing). The model runs in
the native decoder stack where it applies (flashlm.runtime.native_decoder), else module by module
(Transformer.forward_paged); both give the same logits.

    num_blocks = kv_cache_blocks(model, block_size, torch.float32, max_model_len, max_num_seqs, "512MiB")
    runner = ModelRunner(model, num_blocks, block_size)
"""

import re
import time
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Optional

import numpy as np
import torch

from flashlm.models.transformer import PagedBatch, Transformer
from flashlm.ops import NativeDecoder
from flashlm.ops.device import available_memory
from flashlm.runtime.block_manager import BlockManager, check_block_size
from flashlm.runtime.logprobs import token_logprobs
from flashlm.runtime.native_decoder import build_native_decoder, forward_paged_native, native_takes_caches
from flashlm.runtime.sampler import Sampler, SamplingInput
from flashlm.runtime.structured import token_bitmask

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value, name="kv_cache_memory") -> int:
    """An int, or a string such as "512MiB" or "2GB"."""
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"{name}: expected bytes or a size such as '512MiB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper() if m.group(2) else None])
    if n <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return n


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.n_layer * block_size * cfg.n_kv_head * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def kv_cache_blocks(model: Transformer, block_size: int, dtype: torch.dtype, max_model_len: int, max_num_seqs: int,
                    kv_cache_memory=None, device="cpu") -> int:
    """How many KV-cache blocks fit in kv_cache_memory (bytes, or a size such as "1GiB"). By default, room for
    every sequence at full length, capped at 1 GiB (but never less than one sequence's). ValueError when the
    blocks cannot hold one sequence of max_model_len tokens, or do not fit in the memory the device has left."""
    per_block = kv_bytes_per_block(model, check_block_size(block_size), dtype)
    blocks_per_seq = -(-max_model_len // block_size)
    if kv_cache_memory is None:
        kv_cache_memory = max(min(blocks_per_seq * max_num_seqs * per_block, 2**30), blocks_per_seq * per_block)
    num_blocks = parse_bytes(kv_cache_memory) // per_block
    if num_blocks * block_size < max_model_len:
        raise ValueError(f"kv_cache_memory: {kv_cache_memory} holds {num_blocks * block_size} tokens, fewer than "
                         f"max_model_len {max_model_len} ({per_block} bytes per block of {block_size})")
    # Checked before allocating: the cache is zero-filled, so an allocation past what is there would not fail
    # cleanly but swap, or end the process.
    needed, available = num_blocks * per_block, available_memory(device)
    if available is not None and needed > available:
        raise ValueError(f"kv_cache_memory: {kv_cache_memory} asks for {_gib(needed)} of KV cache ({num_blocks} blocks "
                         f"of {block_size} tokens), but {torch.device(device)} has {_gib(available)} available; "
                         f"pass a smaller kv_cache_memory or max_model_len")
    return num_blocks


def kv_window(*models) -> Optional[int]:
    """The sliding window beyond which the KV cache may drop a sequence's keys: the widest of the models' (the
    target's and a draft's read the same blocks), None where any attends globally (ModelConfig.kv_window)."""
    windows = [m.cfg.kv_window for m in models if m is not None]
    return None if None in windows else max(windows)


@dataclass
class StepOutput:
    tokens: list  # the next token of each sampling sequence of the batch, in batch order
    logprobs: Optional[list] = None  # Sampler.sample's: None, or a TokenLogprobs or None per sampling sequence


def prompt_logprob_rows(batch) -> list:
    """[(seq, first_row, first_target, count)]: the rows of the packed step whose logits give prompt logprobs not
    computed yet. Position p's logits predict token p + 1; a sequence's chunk [start, start + n) starts at row
    first_row (its tokens follow those of the sequences before it)."""
    out, offset = [], 0
    for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new):
        if seq.prompt_logprobs_pending:
            first = max(start, len(seq.prompt_logprobs) - 1)
            end = min(start + n, seq.num_prompt_tokens - 1)
            if end > first:
                out.append((seq, offset + first - start, first + 1, end - first))
        offset += n
    return out


def token_slots(block_table: torch.Tensor, starts, num_new, block_size: int):
    """(positions, slots) int64 [T] of a packed step: sequence i's tokens [starts[i], starts[i] + num_new[i]),
    sequence after sequence, and their cache slots block_table[i, p // block_size] * block_size +
    p % block_size (BlockManager.slot_mapping's, for the whole batch at once). In numpy: a torch op costs
    several times a numpy one at these sizes, and the point is a fixed cost per step."""
    counts = np.asarray(num_new, dtype=np.int64)
    seq_of = np.repeat(np.arange(len(counts)), counts)
    first_row = np.cumsum(counts) - counts  # each sequence's first row of the packed step
    positions = np.asarray(starts, dtype=np.int64)[seq_of] + np.arange(len(seq_of)) - first_row[seq_of]
    blocks = block_table.numpy()[seq_of, positions // block_size].astype(np.int64)
    return torch.from_numpy(positions), torch.from_numpy(blocks * block_size + positions % block_size)


def sampling_input(seq, generators) -> SamplingInput:
    """The sequence's SamplingInput: made once and kept on the sequence, except with penalties, which read the
    tokens so far each step."""
    if seq.params.has_penalties:
        return SamplingInput(seq.params, seq.prompt_ids, seq.output_ids, generators.get(seq.seq_id))
    if seq.sampling_input is None:
        seq.sampling_input = SamplingInput(seq.params, (), (), generators.get(seq.seq_id))
    return seq.sampling_input


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, kv_dtype: torch.dtype = torch.float32,
                 device="cpu", native_decoder: bool = True):
        cfg = model.cfg
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # The K/V heads this model computes: all of them, or a tensor-parallel rank's (runtime/tp_shard.py).
        kv_heads = model.blocks[0].attn.n_kv_head if len(model.blocks) else cfg.n_kv_head
        shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
        # Zero-filled: a slot is read only after it is written, but zeros keep a bug from reading garbage NaNs.
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)) for _ in range(cfg.n_layer)]
        self.sampler = Sampler(cfg.vocab_size)
        self.forward_seconds = 0.0  # time inside the model's forward (the rest of a step is host overhead)
        self.use_native_decoder = native_decoder  # False: every step module by module
        self.kv_prefix = None  # a prefix-tuning adapter's K/V (runtime.virtual_tokens.KVPrefix)
        self._native = None  # built on first use; False: checked, does not apply

    # ---- the forward pass -----------------------------------------------------------------------------------

    def native_decoder(self) -> Optional[NativeDecoder]:
        """The native decoder stack the steps run (built over the model's weights on first use), or None: switched
        off (use_native_decoder), a model it does not apply to (build_native_decoder), or caches it does not read.
        After replacing or moving the model's modules, call reset_native_decoder()."""
        if not self.use_native_decoder:
            return None
        if self._native is None:
            applies = self.device.type == "cpu" and native_takes_caches(self.kv_caches)
            self._native = (applies and build_native_decoder(self.model)) or False
        return self._native or None

    def reset_native_decoder(self) -> None:
        self._native = None

    def close(self) -> None:
        """Nothing to end in one process (a tensor-parallel runner ends its workers)."""

    def forward(self, tokens, paged: PagedBatch) -> torch.Tensor:
        t = time.perf_counter()
        native = self.native_decoder()
        if native is not None:
            logits = forward_paged_native(self.model, native, tokens, paged, self.kv_caches)
        else:
            logits = self.model.forward_paged(tokens, paged, self.kv_caches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the sampler reads the logits next anyway
        self.forward_seconds += time.perf_counter() - t
        return logits

    # ---- the cache --------------------------------------------------------------------------------------------

    def copy_blocks(self, copies) -> None:
        """Copies whole blocks [(src, dst), ...], K and V of every layer (the block manager's copy-on-write)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def move_slots(self, src, dst) -> None:
        """Copies the K and V rows of cache slots src[i] to slots dst[i] (block * block_size + offset), every
        layer."""
        if not src:
            return
        src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for cache in (c for pair in self.kv_caches for c in pair):
            rows = cache.view(-1, *cache.shape[2:])
            rows[dst_t] = rows[src_t]

    # ---- steps ------------------------------------------------------------------------------------------------

    def paged_batch(self, positions, slots, block_table: torch.Tensor, seq_lens, query_lens, logits_rows) -> PagedBatch:
        """A PagedBatch on the runner's device: each new token's position and cache slot (sequence after
        sequence), the block tables int32 [S, max_blocks], each sequence's length after the step and its number
        of new tokens, and the rows whose logits are wanted."""
        dev = self.device
        decode = all(n == 1 for n in query_lens)  # one new token each: no cu_seqlens_q
        return PagedBatch(
            positions=torch.as_tensor(positions, dtype=torch.int64).to(dev),
            slot_mapping=torch.as_tensor(slots, dtype=torch.int64).to(dev),
            block_table=block_table.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=None if decode else torch.tensor([0, *accumulate(query_lens)], dtype=torch.int32, device=dev),
            max_seqlen_q=max(query_lens),
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )

    def prepare(self, batch, bm: BlockManager, prompt_rows=()):
        """(tokens int64 [T], PagedBatch) for a ScheduledBatch; prompt_rows: prompt_logprob_rows(batch), whose
        rows' logits are wanted after the sampling rows'. The positions and cache slots come from the block
        tables in a few tensor ops, so the per-sequence Python work is one slice of token ids each."""
        tokens, rows, ends = [], [], []
        for seq, start, n, sampling in zip(batch.seqs, batch.starts, batch.num_new, batch.sampling):
            tokens += seq.token_ids[start:start + n]
            ends.append(start + n)
            if sampling:
                rows.append(len(tokens) - 1)
        for _, first_row, _, count in prompt_rows:
            rows += range(first_row, first_row + count)
        block_table = bm.block_tables_tensor([s.seq_id for s in batch.seqs])
        positions, slots = token_slots(block_table, batch.starts, batch.num_new, bm.block_size)
        paged = self.paged_batch(positions, slots, block_table, ends, batch.num_new, rows)
        return torch.tensor(tokens, dtype=torch.int64, device=self.device), paged

    def run(self, batch, bm: BlockManager, generators, mirror: "ModelRunner" = None) -> StepOutput:
        """The next token of each sampling sequence of the batch, in batch order, with the logprobs asked for.
        generators: seq_id -> the request's torch.Generator (seeded requests only). mirror: a draft model's
        runner, whose cache gets the same tokens' K and V (speculative decoding needs the draft's cache to follow
        the target's)."""
        self.copy_blocks(batch.block_copies)
        if self.kv_prefix is not None:  # the prefix's slots written here; the forward runs the real tokens
            batch = self.kv_prefix.write(batch, bm, self.kv_caches)
            if not batch.seqs:
                return StepOutput([])
        prompt_rows = prompt_logprob_rows(batch)
        tokens, paged = self.prepare(batch, bm, prompt_rows)
        if mirror is not None:
            mirror.copy_blocks(batch.block_copies)
            mirror.forward(tokens, replace(paged, logits_rows=paged.logits_rows[:0]))
        logits = self.forward(tokens, paged)
        sampling = [seq for seq, s in zip(batch.seqs, batch.sampling) if s]
        inputs = [sampling_input(seq, generators) for seq in sampling]
        if len(logits) > len(inputs):
            self._prompt_logprobs(prompt_rows, logits[len(inputs):])
        if not inputs:
            return StepOutput([])
        bitmask = token_bitmask([seq.matcher for seq in sampling], self.sampler.vocab_size)
        tokens, logprobs = self.sampler.sample(logits[:len(inputs)], inputs, bitmask)
        return StepOutput(tokens.tolist(), logprobs)

    def _prompt_logprobs(self, plan, logits: torch.Tensor) -> None:
        """Appends to each sequence's prompt_logprobs from the logits of its prompt rows (the model's own
        distribution: no penalties, no temperature), packed as prompt_logprob_rows (`plan`) lists them."""
        logprobs = logits[:, :self.sampler.vocab_size].float().log_softmax(dim=-1)
        targets = [t for seq, _, first, count in plan for t in seq.token_ids[first:first + count]]
        num_top = [seq.params.prompt_logprobs for seq, _, _, count in plan for _ in range(count)]
        entries = token_logprobs(logprobs, torch.tensor(targets, device=logits.device), num_top)
        start = 0
        for seq, _, _, count in plan:
            seq.prompt_logprobs += entries[start:start + count]
            start += count
