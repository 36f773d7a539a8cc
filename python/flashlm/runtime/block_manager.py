"""The KV-cache block manager: which physical cache blocks each sequence's tokens live in.

The paged KV cache is, per layer, K and V tensors [num_blocks, block_size, kv_heads, head_dim]. Token t of a
sequence lives in block block_table[t // block_size] at offset t % block_size. This class owns the
bookkeeping only (free lists, reference counts, prefix hashes); the model runner owns the tensors, and the
scheduler decides whom to admit, defer or preempt by asking `can_allocate` / `can_append`.

    bm = BlockManager(num_blocks=1024, block_size=16)
    cached = bm.allocate(seq_id=0, token_ids=prompt)   # prompt tokens [0, cached) are already in the cache
    slots = bm.slot_mapping(0, cached, len(prompt))    # where the runner writes the others' K and V
    tokens = prompt + [next_token]
    copies = bm.append(0, tokens)                      # (src, dst) block copies to do before writing
    copies = bm.append_batch([0, 1], [tokens, other], [len(tokens), len(other)])   # a whole step, all or nothing
    tables = bm.block_tables_tensor([0, 1])            # int32 [2, max_blocks], zero-padded
    bm.free(0)

The token ids are the caller's (the scheduler's Sequence holds them). Per sequence the manager keeps how many
tokens it holds, their blocks and the full blocks' hashes, no copy of the ids: `append` is given the
sequence's token list (the tokens held first, then at least the new ones) and reads the new tokens, and those
of the partly filled last block to name it when it fills.

Timing contract. The tokens given to `allocate` (from the first uncached one) and the new tokens of `append`
are the tokens whose K/V the runner writes in its next forward step, at `slot_mapping(...)`. A block is entered in
the prefix cache as soon as it is full, so another sequence may hit it from then on: the runner must write
it in that same step, before or while the other sequence reads it (true of one batched forward, where each
layer writes the cache before attending). A prefill split into chunks is `allocate(first_chunk)` followed
by `append` of the next chunk per step; the prefix lookup covers the first chunk.

Prefix caching (as vLLM's). A full block is named by a chained hash, blake2b-256 of (the previous block's
hash, the block's token ids as little-endian int64), so a name stands for the whole prefix up to the block's
end. The cache maps a name to one physical block, which also stores its previous block's hash and its own
token ids; a hit compares both, so a hash collision in the last link cannot share wrong content (one deeper
in the chain would need a blake2b-256 collision). A block that becomes full with a name already in the
cache (the same content computed twice) stays out of the cache and is freed normally.
Blocks whose sequences are all freed keep their name and wait in an LRU pool; a later hit revives them. A
fresh block comes from the never-named free blocks first and only then from the LRU pool's oldest end,
which drops its name (eviction). A sequence's blocks enter the pool tail first, so a prefix outlives its
longer continuations.

Copy-on-write. `fork` shares all of the parent's blocks. Full blocks are never written again, so only a
shared, partly filled last block needs copying: `append` then moves the sequence to a fresh block and
returns the (src, dst) pair, which the runner must copy (every layer, K and V, the whole block) before it
writes the new tokens.

Sliding window (Mistral's: every layer attends to the last `window` keys, itself included). A query at
position p reads keys [p - window + 1, p] only, so once a sequence's next query is at n (its length before an
`append`), its blocks wholly before n - window + 1 are never read again: `append` releases them before taking
new ones (and `can_append` counts them as free), keeping about ceil(window / block_size) + 1 blocks per
sequence. The table keeps a placeholder (block 0, which the kernels skip: they read only the keys in the
window) so that positions stay where they are. A released block is an ordinary unused block: named, it waits
in the LRU pool with its contents intact, and a prefix hit on it (which needs the whole chain of names up to
it) revives it as it would any other. A prompt is allocated whole, for its prefill reads it all.

Every call checks its arguments and either does all of its work or raises and changes nothing.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from flashlm.runtime.checks import as_bool, as_count, as_optional_count, as_token_ids

# Block ids go to the kernels as int32 block tables; a block of more tokens than this is no cache layout
# anyone uses (vLLM's default is 16, flash-attn's paged kernels take multiples of 256).
MAX_NUM_BLOCKS = (1 << 31) - 1
MAX_BLOCK_SIZE = 1 << 16


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks for the request; nothing was changed (the scheduler defers or preempts)."""


class BlockTableOverflowError(ValueError):
    """A sequence would need more blocks than max_blocks_per_seq."""


@dataclass
class PrefixCacheStats:
    """Prefix-cache hits over successful `allocate` calls (failed ones count nothing)."""

    queries: int = 0          # allocate calls
    queried_tokens: int = 0   # prompt tokens offered to the cache
    hit_tokens: int = 0       # of those, the tokens found cached (sum of the calls' num_cached_tokens)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class _Block:
    __slots__ = ("ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self):
        self.ref_count = 0
        self.hash: Optional[bytes] = None          # set only while the cache maps this hash to this block
        self.parent_hash: Optional[bytes] = None   # with hash: the previous block's hash (None for the first)
        self.token_ids: Optional[tuple] = None     # with hash: this block's tokens, compared on a hit


class _Sequence:
    __slots__ = ("num_tokens", "block_table", "block_hashes", "num_cached_tokens", "num_released")

    def __init__(self, num_tokens, block_table, block_hashes, num_cached_tokens, num_released=0):
        self.num_tokens = num_tokens      # the tokens held: computed, or about to be
        self.block_table = block_table    # list[int], physical block ids
        self.block_hashes = block_hashes  # list[bytes], the chained hash of each full block (with caching)
        self.num_cached_tokens = num_cached_tokens
        self.num_released = num_released  # the table's first entries, released (outside the window): placeholders

    def held_blocks(self) -> list:
        return self.block_table[self.num_released:]


def block_hash(parent_hash: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """The chained name of a full block: blake2b-256 over the parent's hash and the tokens as int64 LE."""
    h = hashlib.blake2b(digest_size=32)
    h.update(parent_hash if parent_hash is not None else b"\0" * 32)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def check_block_size(block_size) -> int:
    return as_count(block_size, "block_size", 1, MAX_BLOCK_SIZE)


def _check_seq_id(seq_id) -> int:
    try:
        return operator.index(seq_id)
    except TypeError:
        raise TypeError(f"seq_id must be an int, got {type(seq_id).__name__}") from None


def _is_iterable(x) -> bool:
    return hasattr(x, "__iter__") and not isinstance(x, (str, bytes))


class BlockManager:
    """Allocates KV-cache blocks to sequences, with reference counting, copy-on-write and prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_blocks_per_seq: Optional[int] = None, window: Optional[int] = None):
        self.num_blocks = as_count(num_blocks, "num_blocks", 1, MAX_NUM_BLOCKS)  # int32 block tables
        self.block_size = check_block_size(block_size)
        self.enable_prefix_caching = as_bool(enable_prefix_caching, "enable_prefix_caching")
        self.max_blocks_per_seq = as_optional_count(max_blocks_per_seq, "max_blocks_per_seq")
        self.window = as_optional_count(window, "window")  # None: every key stays readable
        # Nothing per block up front: blocks are handed out in id order the first time, so _blocks[b] is the
        # _Block of every block used so far and ids [len(_blocks), num_blocks) were never used. Free blocks are
        # those, taken first, then the returned ones in the order they came back.
        self._blocks: list = []
        self._free = deque()                           # returned: ref 0, no hash
        self._evictable: OrderedDict = OrderedDict()  # ref 0, hashed; oldest first
        self._cache: dict = {}                         # hash -> block id
        self._seqs: dict = {}
        self.stats = PrefixCacheStats()

    # ---- queries -------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: never-named free blocks plus cached blocks no sequence uses."""
        return self.num_blocks - len(self._blocks) + len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """The fraction of blocks some sequence holds."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks named in the prefix cache, in use or not."""
        return len(self._cache)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list:
        """The ids of the allocated sequences, in allocation order."""
        return list(self._seqs)

    def block_table(self, seq_id: int) -> list:
        """The sequence's block ids by position; the first num_released_blocks are placeholders (0)."""
        return list(self._seq(seq_id).block_table)

    def num_released_blocks(self, seq_id: int) -> int:
        """The sequence's leading blocks released as outside the sliding window (0 without one)."""
        return self._seq(seq_id).num_released

    def seq_len(self, seq_id: int) -> int:
        """How many of the sequence's tokens the manager holds (computed, or written by the next step)."""
        return self._seq(seq_id).num_tokens

    def num_cached_tokens(self, seq_id: int) -> int:
        """The prompt tokens `allocate` found in the prefix cache (the runner skips them); kept by `fork`."""
        return self._seq(seq_id).num_cached_tokens

    def ref_count(self, block_id: int) -> int:
        block_id = self._check_block_id(block_id)
        return self._blocks[block_id].ref_count if block_id < len(self._blocks) else 0

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is named in the prefix cache (a later prompt with its prefix can hit it)."""
        block_id = self._check_block_id(block_id)
        return block_id < len(self._blocks) and self._blocks[block_id].hash is not None

    def free_block_ids(self) -> list:
        """Unused blocks with no name, in the order they will be handed out."""
        return list(range(len(self._blocks), self.num_blocks)) + list(self._free)

    def evictable_block_ids(self) -> list:
        """Unused cached blocks, the next to be evicted first."""
        return list(self._evictable)

    # ---- capacity ------------------------------------------------------------------------------------------

    def can_allocate(self, prompt: Union[int, Iterable[int]], reuse_cache: bool = True,
                     max_cached_tokens: Optional[int] = None) -> bool:
        """Whether `allocate` of a prompt would find enough blocks. Given a token count it assumes no prefix
        hit (conservative); given the token ids it counts the hits exactly, as `allocate` would."""
        if not _is_iterable(prompt):
            num_tokens = operator.index(prompt)
            if num_tokens < 1:
                raise ValueError(f"prompt length must be >= 1, got {num_tokens}")
            return self._blocks_for(num_tokens) <= self.num_free_blocks
        tokens = as_token_ids(prompt, "prompt")
        if not tokens:
            raise ValueError("prompt is empty")
        hits, _ = self._lookup(tokens, max_cached_tokens) if reuse_cache else ([], [])
        return self._free_blocks_needed_for_prompt(len(tokens), hits) <= self.num_free_blocks

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether `append` of num_new_tokens tokens to the sequence would find enough blocks."""
        num_new_tokens = as_count(num_new_tokens, "num_new_tokens")
        return self._fresh_needed_for_append(self._seq(seq_id), num_new_tokens) <= self.num_free_blocks

    # ---- sequence lifetime ---------------------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Iterable[int], reuse_cache: bool = True,
                 max_cached_tokens: Optional[int] = None) -> int:
        """Gives a new sequence the blocks for its prompt, reusing cached blocks of its longest cached prefix
        unless reuse_cache is False (a sequence that needs every prompt position's logits). Returns the number
        of prompt tokens already in the cache: a whole number of blocks, at most len(token_ids) - 1 so that the
        last token is computed (its logits are needed), and at most max_cached_tokens (a sequence that needs
        the logits of the positions after it). Its full blocks are named in the cache either way."""
        seq_id = _check_seq_id(seq_id)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        tokens = as_token_ids(token_ids, "token_ids")
        if not tokens:
            raise ValueError(f"token_ids of sequence {seq_id} is empty")
        self._check_table_size(seq_id, self._blocks_for(len(tokens)))
        hits, hashes = self._lookup(tokens, max_cached_tokens) if as_bool(reuse_cache, "reuse_cache") else ([], [])
        needed = self._free_blocks_needed_for_prompt(len(tokens), hits)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {needed} free blocks for {len(tokens)} prompt "
                                    f"tokens ({len(hits)} cached), {self.num_free_blocks} free")
        # Revive the hits first, so that taking fresh blocks cannot evict them.
        for b in hits:
            self._incref(b)
        fresh = self._blocks_for(len(tokens)) - len(hits)
        table = hits + [self._take_free_block() for _ in range(fresh)]
        seq = _Sequence(len(tokens), table, hashes[:len(hits)], len(hits) * self.block_size)
        if self.enable_prefix_caching:
            bs = self.block_size
            for i in range(len(hits), len(tokens) // bs):
                self._register_full_block(seq, i, tuple(tokens[i * bs:(i + 1) * bs]))
        self._seqs[seq_id] = seq
        self.stats.queries += 1
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += seq.num_cached_tokens
        return seq.num_cached_tokens

    def append(self, seq_id: int, token_ids: Sequence[int], num_new_tokens: Optional[int] = None) -> list:
        """Grows a sequence by its next tokens, taking blocks as the last one fills. token_ids: the sequence's
        tokens as the caller holds them, the seq_len held ones first; the next num_new_tokens of them (default:
        all the rest) are appended. Returns the block copies [(src, dst), ...] the runner must do before writing
        the new tokens: at most one, when the partly filled last block is shared with a fork (copy-on-write)."""
        seq = self._seq(seq_id)
        n = seq.num_tokens
        if not hasattr(token_ids, "__len__") or not hasattr(token_ids, "__getitem__"):
            raise TypeError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
        if num_new_tokens is None:
            num_new = len(token_ids) - n
            if num_new < 1:
                raise ValueError(f"token_ids appended to sequence {seq_id} is empty: no token after the {n} held")
        else:
            num_new = as_count(num_new_tokens, "num_new_tokens")
            if len(token_ids) < n + num_new:
                raise ValueError(f"token_ids of sequence {seq_id}: {len(token_ids)} tokens, fewer than the {n} "
                                 f"held and {num_new} new")
        end = n + num_new
        window = self._new_tokens(seq_id, seq, token_ids, end)
        fresh = self._fresh_needed_for_append(seq, num_new)
        if fresh > self.num_free_blocks:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {fresh} new blocks to append {num_new} "
                                    f"tokens, {self.num_free_blocks} free")
        return self._grow(seq, window, end)

    def append_batch(self, seq_ids: Sequence[int], token_lists: Sequence, ends: Sequence[int]) -> list:
        """`append` for a whole step's batch in one call: sequence seq_ids[i] grows to hold the first ends[i] of
        token_lists[i] (nothing where it holds them already), in batch order. All or nothing: raises
        NoFreeBlocksError, changing nothing, unless the appends in that order each find their blocks (the
        scheduler then goes sequence by sequence, preempting). Returns the block copies of all of them."""
        if not len(seq_ids) == len(token_lists) == len(ends):
            raise ValueError(f"append_batch: seq_ids, token_lists and ends must have one entry per sequence, got "
                             f"{len(seq_ids)}, {len(token_lists)} and {len(ends)}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids: a sequence appears twice in the batch")
        # The common decode step first: one token into the partly filled last block, held by this sequence alone
        # (no block taken, none filled, none released), checked for the whole batch at once; the others planned.
        bs, plain, plain_tokens, plan, needed, free = self.block_size, [], [], [], 0, self.num_free_blocks
        for seq_id, seq, token_ids, end in zip(seq_ids, self._seqs_of(seq_ids), token_lists, ends):
            n = seq.num_tokens
            if (type(end) is int and end == n + 1 and n % bs and end % bs and self.window is None
                    and type(token_ids) is list and len(token_ids) >= end
                    and self._blocks[seq.block_table[-1]].ref_count == 1):
                plain.append(seq)
                plain_tokens.append(token_ids[n])
                continue
            end = as_count(end, "ends", 0)
            if end <= n:
                continue
            if not hasattr(token_ids, "__len__") or not hasattr(token_ids, "__getitem__"):
                raise TypeError(f"token_lists: expected sequences of ints, got {type(token_ids).__name__}")
            window = self._new_tokens(seq_id, seq, token_ids, end)
            # An upper bound: an earlier append of the batch can only free blocks that this one counts as taken
            # (a copy-on-write that leaves a shared block to one holder, a release outside the window).
            needed += self._fresh_needed_for_append(seq, end - n)
            if needed > free:
                raise NoFreeBlocksError(f"sequence {seq_id}: the batch's appends up to it need {needed} new blocks, "
                                        f"{free} free")
            plan.append((seq, window, end))
        as_token_ids(plain_tokens, "token_lists")
        for seq in plain:
            seq.num_tokens += 1
        copies = []
        for seq, window, end in plan:
            copies += self._grow(seq, window, end)
        return copies

    def _new_tokens(self, seq_id, seq: _Sequence, token_ids, end: int) -> list:
        """The tokens an append to `end` reads, checked: the held ones of the partly filled last block (to name
        it when it fills), then the new ones."""
        if len(token_ids) < end:
            raise ValueError(f"token_ids of sequence {seq_id}: {len(token_ids)} tokens, fewer than the {end} it "
                             f"is to hold")
        n = seq.num_tokens
        window = as_token_ids(token_ids[n - n % self.block_size:end], "token_ids")
        self._check_table_size(seq_id, self._blocks_for(end))
        return window

    def _grow(self, seq: _Sequence, window: list, end: int) -> list:
        """Appends tokens [seq.num_tokens, end) (window: from the start of the last block), the blocks checked
        free; returns the block copies."""
        bs, n = self.block_size, seq.num_tokens
        first = n - n % bs
        if self.window is not None:
            self._release_outside_window(seq)
        copies = []
        if self._last_block_is_shared_partial(seq):
            src = seq.block_table[-1]
            dst = self._take_free_block()
            self._blocks[src].ref_count -= 1  # still >= 1: another sequence holds it
            seq.block_table[-1] = dst
            copies.append((src, dst))
        for pos in range(n, end):
            if pos % bs == 0:
                seq.block_table.append(self._take_free_block())
            if self.enable_prefix_caching and (pos + 1) % bs == 0:
                start = pos + 1 - bs
                self._register_full_block(seq, pos // bs, tuple(window[start - first:pos + 1 - first]))
        seq.num_tokens = end
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Makes child_id a copy of parent_id that shares all its blocks (copy-on-write on `append`). Fork
        after the parent's tokens are computed: the child reads the same cache entries."""
        parent = self._seq(parent_id)
        child_id = _check_seq_id(child_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} (fork child) is already allocated")
        for b in parent.held_blocks():
            self._blocks[b].ref_count += 1
        self._seqs[child_id] = _Sequence(parent.num_tokens, list(parent.block_table), list(parent.block_hashes),
                                         parent.num_cached_tokens, parent.num_released)

    def free(self, seq_id: int) -> None:
        """Releases a sequence's blocks. Named blocks that no sequence holds any more wait in the LRU pool."""
        seq_id = _check_seq_id(seq_id)
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"cannot free sequence {seq_id}: not allocated (never, or already freed)")
        # Tail first, so that a prefix shared by more prompts is evicted after its continuations.
        for b in reversed(seq.held_blocks()):
            self._decref(b)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached name (e.g. after the weights change). Unused cached blocks become free; blocks
        in use stay with their sequences, uncached. Statistics are kept (see `reset_stats`)."""
        for b in self._cache.values():
            block = self._blocks[b]
            block.hash = block.parent_hash = block.token_ids = None
        self._cache.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def reset_stats(self) -> None:
        self.stats = PrefixCacheStats()

    # ---- what the kernels read -----------------------------------------------------------------------------

    def slot_mapping(self, seq_id: int, start: int, end: Optional[int] = None) -> list:
        """Cache slots (block * block_size + offset) of the sequence's tokens [start, end), end defaulting to
        its length: where the runner writes their K and V (int64 slot_mapping of write_kv_cache)."""
        seq = self._seq(seq_id)
        n = seq.num_tokens
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"slot range [{start}, {end}) of sequence {seq_id} is outside [0, {n}]")
        if start < end and start < seq.num_released * self.block_size:
            raise ValueError(f"slot range [{start}, {end}) of sequence {seq_id}: its blocks before position "
                             f"{seq.num_released * self.block_size} were released (outside the sliding window)")
        bs, table = self.block_size, seq.block_table
        return [table[t // bs] * bs + t % bs for t in range(start, end)]

    def block_tables_tensor(self, seq_ids: Sequence[int], max_blocks: Optional[int] = None):
        """The block tables of a batch as int32 [len(seq_ids), max_blocks] (default: the longest table), padded
        with 0. The kernels read only the first ceil(seq_len / block_size) entries of a row, and 0 is a valid
        block, so the padding is never used and could not read out of bounds if it were."""
        import torch

        tables = [seq.block_table for seq in self._seqs_of(seq_ids)]
        longest = max((len(t) for t in tables), default=0)
        if max_blocks is None:
            max_blocks = max(longest, 1)
        elif not longest <= as_count(max_blocks, "max_blocks", 0) <= self.num_blocks:
            # A table lists distinct blocks, so a row wider than num_blocks is padding alone (and its size is
            # the caller's to choose: 2^31 would be an 8 GiB tensor of zeros).
            raise ValueError(f"max_blocks: must be in [{longest}, {self.num_blocks}] (the longest block table of "
                             f"the batch, the number of blocks), got {max_blocks}")
        if not tables:
            return torch.zeros((0, max_blocks), dtype=torch.int32)
        # The tables' ids laid into a zeroed array in one masked assignment: no list or tensor per row.
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        out = np.zeros((len(tables), max_blocks), dtype=np.int32)
        out[np.arange(max_blocks) < lengths[:, None]] = np.fromiter(chain.from_iterable(tables), dtype=np.int32,
                                                                    count=int(lengths.sum()))
        return torch.from_numpy(out)

    def seq_lens_tensor(self, seq_ids: Sequence[int]):
        """The batch's sequence lengths as int32 [len(seq_ids)] (seq_lens of paged_attention)."""
        import torch

        return torch.tensor([self._seq(s).num_tokens for s in seq_ids], dtype=torch.int32)

    # ---- internals -----------------------------------------------------------------------------------------

    def _seq(self, seq_id) -> _Sequence:
        seq = self._seqs.get(_check_seq_id(seq_id))
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id} (never allocated, or freed)")
        return seq

    def _seqs_of(self, seq_ids) -> list:
        """The _Sequences of a batch's ids: one dict lookup each when all are ints (a float equal to an id
        would find it too, hence the type check), else _seq's checks and errors."""
        if set(map(type, seq_ids)) <= {int}:
            try:
                return [self._seqs[s] for s in seq_ids]
            except KeyError:
                pass
        return [self._seq(s) for s in seq_ids]

    def _check_block_id(self, block_id) -> int:
        block_id = operator.index(block_id)
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id {block_id} is outside [0, {self.num_blocks})")
        return block_id

    def _check_table_size(self, seq_id: int, num_blocks: int) -> None:
        if self.max_blocks_per_seq is not None and num_blocks > self.max_blocks_per_seq:
            raise BlockTableOverflowError(f"sequence {seq_id} would need {num_blocks} blocks, more than "
                                          f"max_blocks_per_seq={self.max_blocks_per_seq}")

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookup(self, tokens: list, max_cached_tokens: Optional[int] = None):
        """The cached blocks of the prompt's longest cached prefix (at most len - 1 tokens, and at most
        max_cached_tokens), and the chained hashes computed on the way (those of the hit blocks first). Changes
        nothing."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        limit = len(tokens) - 1
        if max_cached_tokens is not None:
            limit = min(limit, as_count(max_cached_tokens, "max_cached_tokens", 0))
        hits, hashes, parent = [], [], None
        for i in range(limit // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(parent, chunk)
            b = self._cache.get(h)
            if b is None:
                break
            block = self._blocks[b]
            if block.token_ids != chunk or block.parent_hash != parent:
                break  # a hash collision: different content under the same name
            hits.append(b)
            hashes.append(h)
            parent = h
        return hits, hashes

    def _free_blocks_needed_for_prompt(self, num_tokens: int, hits: list) -> int:
        """Fresh blocks, plus the hits that revive a block of the LRU pool (it stops counting as free)."""
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return self._blocks_for(num_tokens) - len(hits) + revived

    def _fresh_needed_for_append(self, seq: _Sequence, num_new: int) -> int:
        """Free blocks the append takes, less those it releases first (outside the window, held by it alone)."""
        grow = self._blocks_for(seq.num_tokens + num_new) - len(seq.block_table)
        needed = grow + (1 if self._last_block_is_shared_partial(seq) else 0)
        if self.window is not None:  # (checked first: this runs for every sequence every step)
            outside = self._blocks_outside_window(seq)
            if outside > seq.num_released:  # a block leaves the window once every block_size tokens
                needed -= sum(1 for b in seq.block_table[seq.num_released:outside] if self._blocks[b].ref_count == 1)
        return needed

    def _blocks_outside_window(self, seq: _Sequence) -> int:
        """How many leading blocks of the sequence no query from its next position on reads: those wholly
        before n - window + 1, n its length (its next query's position)."""
        return max(0, seq.num_tokens - self.window + 1) // self.block_size

    def _release_outside_window(self, seq: _Sequence) -> None:
        """Releases the blocks no later query reads, leaving placeholders (0) in the table."""
        for i in range(seq.num_released, self._blocks_outside_window(seq)):
            self._decref(seq.block_table[i])
            seq.block_table[i] = 0
            seq.num_released = i + 1

    def _last_block_is_shared_partial(self, seq: _Sequence) -> bool:
        return seq.num_tokens % self.block_size != 0 and self._blocks[seq.block_table[-1]].ref_count > 1

    def _decref(self, b: int) -> None:
        """Drops one holder of block b; unheld, it waits in the LRU pool if named, else is free."""
        block = self._blocks[b]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def _incref(self, b: int) -> None:
        block = self._blocks[b]
        if block.ref_count == 0:
            del self._evictable[b]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        """A block with ref count 1 and no name: a never-named free one, else the least recently used cached
        one (evicted). Callers have checked num_free_blocks."""
        if len(self._blocks) < self.num_blocks:
            b = len(self._blocks)
            self._blocks.append(_Block())
        elif self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            block = self._blocks[b]
            del self._cache[block.hash]
            block.hash = block.parent_hash = block.token_ids = None
        self._blocks[b].ref_count = 1
        return b

    def _register_full_block(self, seq: _Sequence, index: int, chunk: tuple) -> None:
        """Names the sequence's full block `index`, holding the tokens `chunk`, and enters it in the cache unless
        the name is taken."""
        parent = seq.block_hashes[index - 1] if index > 0 else None
        h = block_hash(parent, chunk)
        seq.block_hashes.append(h)
        if h in self._cache:
            return  # the same content computed twice (or a collision): the cached block keeps the name
        b = seq.block_table[index]
        block = self._blocks[b]  # just filled, so held by this sequence alone (copy-on-write) and unnamed
        block.hash, block.parent_hash, block.token_ids = h, parent, chunk
        self._cache[h] = b
