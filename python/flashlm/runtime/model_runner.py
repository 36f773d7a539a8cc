"""ModelRunner: owns the paged KV cache tensors and turns a scheduled step into one forward pass.

For each step it packs the new tokens of every scheduled sequence into one row, builds the PagedBatch
(positions, cache slots, block tables, sequence lengths, cu_seqlens_q), makes the block copies the block
manager asked for, runs the model and samples the sequences whose chunk reached their end. The model runs in
the native decoder stack where it applies (flashlm.runtime.native_decoder), else module by module
(Transformer.forward_paged); both give the same logits.
"""

import time
from dataclasses import replace
from typing import Optional

import torch

from flashlm.models.transformer import PagedBatch, Transformer
from flashlm.ops import NativeDecoder
from flashlm.runtime.block_manager import BlockManager
from flashlm.runtime.native_decoder import build_native_decoder, forward_paged_native, native_takes_caches
from flashlm.runtime.sampler import Sampler, SamplingInput


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.n_layer * block_size * cfg.n_kv_head * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, kv_dtype: torch.dtype = torch.float32,
                 device="cpu", native_decoder: bool = True):
        cfg = model.cfg
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.n_kv_head, cfg.head_dim)
        # Zero-filled: a slot is read only after it is written, but zeros keep a bug from reading garbage NaNs.
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)) for _ in range(cfg.n_layer)]
        self.sampler = Sampler(cfg.vocab_size)
        self.forward_seconds = 0.0  # time inside the model's forward (the rest of a step is host overhead)
        self.use_native_decoder = native_decoder  # False: every step module by module
        self._native = None  # built on first use; False: checked, does not apply

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

    def copy_blocks(self, copies) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare(self, batch, bm: BlockManager):
        """(tokens int64 [T], PagedBatch) for a ScheduledBatch."""
        tokens, positions, slots, seq_lens, cu = [], [], [], [], [0]
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new):
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += bm.slot_mapping(seq.seq_id, start, start + n)
            seq_lens.append(start + n)
            cu.append(cu[-1] + n)
        sampling = batch.sampling
        rows = [cu[i + 1] - 1 for i, s in enumerate(sampling) if s]
        decode = cu[-1] == len(batch.seqs)  # every sequence has exactly one new token
        dev = self.device
        paged = PagedBatch(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=bm.block_tables_tensor([s.seq_id for s in batch.seqs]).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=None if decode else torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(batch.num_new),
            logits_rows=torch.tensor(rows, dtype=torch.int64, device=dev),
        )
        return torch.tensor(tokens, dtype=torch.int64, device=dev), paged

    def run(self, batch, bm: BlockManager, generators, mirror: "ModelRunner" = None) -> list:
        """The next token of each sampling sequence of the batch, in batch order. generators: seq_id -> the
        request's torch.Generator (seeded requests only). mirror: a draft model's runner, whose cache gets the
        same tokens' K and V (speculative decoding needs the draft's cache to follow the target's)."""
        self.copy_blocks(batch.block_copies)
        tokens, paged = self.prepare(batch, bm)
        if mirror is not None:
            mirror.copy_blocks(batch.block_copies)
            mirror.forward(tokens, replace(paged, logits_rows=paged.logits_rows[:0]))
        logits = self.forward(tokens, paged)
        inputs = [SamplingInput(seq.params, seq.prompt_ids, seq.output_ids, generators.get(seq.seq_id))
                  for seq, s in zip(batch.seqs, batch.sampling) if s]
        if not inputs:
            return []
        return self.sampler(logits, inputs).tolist()
