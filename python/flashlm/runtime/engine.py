"""LLM: the serving engine. Requests go in; each step schedules (Scheduler), runs the model over the paged
KV cache (ModelRunner) and post-processes (stop rules, detokenization, metrics).

    llm = LLM("model.gguf")                                    # or an HF directory, or LLM(model, tokenizer)
    llm = LLM("big.gguf", draft_model="small.gguf", num_speculative_tokens=4)   # speculative decoding
    llm = LLM("model.gguf", native_decoder=False)              # every step module by module (see ModelRunner)
    llm = LLM("base.gguf", lora="runs/sft")                   # an adapter on the base, unmerged (LoRA, prompt or prefix tuning)
    llm = LLM("model.gguf", tensor_parallel_size=2)           # every layer split over 2 processes (runtime/tensor_parallel.py)
    outs = llm.generate(["Hello", "The sky"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].metrics.time_to_first_token)
    for out in llm.stream("Once upon a time", SamplingParams(max_tokens=64)): print(out.outputs[0].text)

The tokenizer is anything with encode(text) -> ids, decode(ids) -> text and eos_token_ids (flashlm.io's
Tokenizer; a HF-style apply_chat_template for chat()).
"""

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from flashlm import ops
from flashlm.models.transformer import Transformer
from flashlm.ops._check import check_fits
from flashlm.runtime.block_manager import BlockManager, check_block_size
from flashlm.runtime.checks import (as_bool, as_count, as_model_source, as_optional_count, as_prompts, as_seed,
                                    as_token_ids, as_kv_cache_dtype)
from flashlm.runtime.model_runner import ModelRunner, kv_bytes_per_block, kv_cache_blocks, kv_window
from flashlm.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.scheduler import Scheduler
from flashlm.runtime.sequence import Sequence
from flashlm.runtime.speculative import SpeculativeDecoder, scratch_blocks_per_seq
from flashlm.runtime.structured import GrammarCompiler, advance
from flashlm.runtime.tensor_parallel import TensorParallelRunner
from flashlm.runtime.tp_shard import check_size, check_tensor_parallel_size
from flashlm.runtime.virtual_tokens import KVPrefix, add_prompt, placeholder_ids


@dataclass
class EngineStats:
    """Counters since the engine started: steps, tokens, and where the time went."""
    steps: int = 0
    step_seconds: float = 0.0  # whole steps: schedule, prepare, forward, sample, post-process
    computed_tokens: int = 0  # tokens run through the model (prefill chunks and decodes)
    output_tokens: int = 0  # tokens appended to outputs

    def summary(self, forward_seconds: float) -> dict:
        host = self.step_seconds - forward_seconds
        return {"steps": self.steps, "output_tokens": self.output_tokens, "step_seconds": self.step_seconds,
                "forward_seconds": forward_seconds, "host_seconds": host,
                "host_ms_per_step": 1e3 * host / max(self.steps, 1),
                "host_share": host / self.step_seconds if self.step_seconds else 0.0}


class _ChatText(str):
    """A prompt rendered by the chat template: encoded without adding special tokens again."""


class _Request:
    def __init__(self, request_id, prompt, prompt_ids, params, seqs, generators):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = seqs
        self.texts = [""] * len(seqs)
        self.generators = generators
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        # The Logprob dicts made so far from each sample's TokenLogprobs (and the prompt's): each made once.
        self.logprob_dicts = [[] for _ in seqs]
        self.prompt_logprob_dicts = [None] * _skipped_prompt_tokens(params, prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self, tokenizer) -> RequestOutput:
        self.metrics.num_output_tokens = max(s.num_output_tokens for s in self.seqs)
        # With stop strings the text is kept up to date each step (it is searched); otherwise decoded here.
        texts = self.texts if self.params.stop else [_decode(tokenizer, s.output_ids) for s in self.seqs]
        outs = [CompletionOutput(i, texts[i], list(s.output_ids), s.finish_reason) for i, s in enumerate(self.seqs)]
        if self.params.logprobs is not None:
            for out, seq, dicts in zip(outs, self.seqs, self.logprob_dicts):
                dicts += [_logprob_dict(e, tokenizer) for e in seq.logprobs[len(dicts):]]
                out.logprobs, out.cumulative_logprob = list(dicts), sum(e.logprob for e in seq.logprobs)
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            done = self.seqs[0].prompt_logprobs
            self.prompt_logprob_dicts += [_logprob_dict(e, tokenizer) for e in done[len(self.prompt_logprob_dicts):]]
            prompt_logprobs = list(self.prompt_logprob_dicts)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), outs, self.finished, self.metrics,
                             prompt_logprobs)


def _check_without_tokenizer(prompt, params) -> None:
    """ValueError for what needs text when the model came without a tokenizer."""
    if isinstance(prompt, str):
        raise ValueError("prompt: this model has no tokenizer, so a prompt must be a list of token ids, not text")
    if params.stop:
        raise ValueError("stop: stop strings need a tokenizer, and this model has none (use stop_token_ids)")
    if params.structured_outputs is not None:
        raise ValueError("structured_outputs: needs a tokenizer, and this model has none")


def _skipped_prompt_tokens(params, prompt_ids) -> int:
    """How many leading prompt tokens get no prompt logprob (None): the first, and those before
    prompt_logprobs_start."""
    return min(params.prompt_logprobs_start, len(prompt_ids))


def _decode(tokenizer, ids) -> str:
    """The text of token ids; "" for a model without a tokenizer (its prompts are token ids, as vLLM's
    skip_tokenizer_init has them)."""
    return "" if tokenizer is None else tokenizer.decode(ids)


def _logprob_dict(entry, tokenizer) -> dict:
    """{token_id: Logprob} for a TokenLogprobs: the chosen token first, then the top N (rank 1 first)."""
    out = {entry.token: Logprob(entry.logprob, entry.rank, _decode(tokenizer, [entry.token]))}
    for rank, (token, logprob) in enumerate(zip(entry.top_ids, entry.top_logprobs), 1):
        if token not in out:
            out[token] = Logprob(logprob, rank, _decode(tokenizer, [token]))
    return out


def _check_tensor_parallel_options(model, device, draft_model, lora) -> None:
    """What tensor parallelism does not combine with, refused before a model is loaded."""
    if isinstance(model, Transformer):
        raise NotImplementedError("model: with tensor_parallel_size > 1 every worker loads the model itself: pass "
                                  "its path (a GGUF file, an HF directory or a run folder), not a Transformer")
    if device.type != "cpu":
        raise NotImplementedError(f"device: tensor-parallel serving runs on CPU processes (its ring is shared "
                                  f"memory), got {device}")
    for value, name in ((draft_model, "draft_model"), (lora, "lora")):
        if value is not None:
            raise NotImplementedError(f"{name}: not supported with tensor_parallel_size > 1")


def _sampling_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params: expected a SamplingParams, got {type(params).__name__}")
    return params


class LLM:
    def __init__(self, model: Union[str, Transformer], tokenizer=None, *, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, kv_cache_memory=None, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_model_len: Optional[int] = None,
                 kv_cache_dtype: Optional[torch.dtype] = None, seed: int = 0, device="cpu",
                 draft_model=None, num_speculative_tokens: int = 4, native_decoder: bool = True, lora=None,
                 tensor_parallel_size: int = 1):
        device = ops.check_device(device)
        # The cheap checks first, before a model is loaded.
        as_model_source(model, "model")
        tensor_parallel_size = check_size(tensor_parallel_size)
        if tensor_parallel_size > 1:
            _check_tensor_parallel_options(model, device, draft_model, lora)
        source = None if isinstance(model, Transformer) else os.path.abspath(model)  # what tensor-parallel workers load
        if lora is not None and not isinstance(lora, (str, os.PathLike)):
            raise TypeError(f"lora: expected a path (a fine-tuning run folder, a PEFT directory or a GGUF adapter), "
                            f"got {type(lora).__name__}")
        if draft_model is not None:
            as_model_source(draft_model, "draft_model")
        max_num_seqs = as_count(max_num_seqs, "max_num_seqs")
        max_num_batched_tokens = as_count(max_num_batched_tokens, "max_num_batched_tokens")
        block_size = check_block_size(block_size)
        enable_prefix_caching = as_bool(enable_prefix_caching, "enable_prefix_caching")
        max_model_len = as_optional_count(max_model_len, "max_model_len")
        kv_cache_dtype = as_kv_cache_dtype(kv_cache_dtype, device)
        seed = as_seed(seed)
        num_speculative_tokens = as_count(num_speculative_tokens, "num_speculative_tokens")
        native_decoder = as_bool(native_decoder, "native_decoder")
        if isinstance(model, Transformer):
            if tokenizer is None:
                raise ValueError("tokenizer: required when model is a Transformer")
        else:
            from flashlm.io import load_model  # the file formats, loaded only when a path is given

            loaded = load_model(model, max_model_len=max_model_len)
            model, tokenizer = loaded.model, loaded.tokenizer if tokenizer is None else tokenizer
        # a prompt- or prefix-tuning adapter's placeholders, before every prompt (runtime.virtual_tokens)
        self.virtual_ids, kv_prefix = [], None
        if lora is not None:  # LoRA wraps the base's layers in place (the native decoder then steps aside)
            from flashlm.io.lora_adapter import load_adapter

            virtual = load_adapter(model, lora)
            if virtual is not None:
                if draft_model is not None:
                    raise NotImplementedError("draft_model: speculative decoding with a prompt- or prefix-tuning "
                                              "adapter")
                kind, table = virtual
                if kind == "PROMPT_TUNING":
                    self.virtual_ids = add_prompt(model, table)
                else:
                    kv_prefix, self.virtual_ids = KVPrefix(table, model.cfg), placeholder_ids(model.cfg, len(table))
        if tensor_parallel_size > 1:  # before any worker starts
            check_tensor_parallel_size(model, tensor_parallel_size)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.max_model_len = min(cfg.seq_len, max_model_len or cfg.seq_len)
        num_blocks = kv_cache_blocks(model, block_size, kv_cache_dtype, self.max_model_len, max_num_seqs,
                                     kv_cache_memory, device)
        if draft_model is not None:
            if num_speculative_tokens >= self.max_model_len:
                raise ValueError(f"num_speculative_tokens: must be less than max_model_len {self.max_model_len} (no "
                                 f"sequence has room for more proposals), got {num_speculative_tokens}")
            draft_model = self._load_draft(draft_model, max_model_len).to(device).eval()
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                                          window=kv_window(model, draft_model))
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                                   max_model_len=self.max_model_len,
                                   eos_token_ids=getattr(tokenizer, "eos_token_ids", ()) or ())
        total_blocks, self.spec = num_blocks, None
        if draft_model is not None:
            total_blocks = self._blocks_with_scratch(num_blocks, num_speculative_tokens, block_size, max_num_seqs,
                                                     kv_cache_dtype, draft_model, device)
        if tensor_parallel_size > 1:  # self.model becomes rank 0's slice
            self.runner = TensorParallelRunner(model, tensor_parallel_size, source, {"max_model_len": max_model_len},
                                               total_blocks, block_size, kv_cache_dtype, device)
        else:
            self.runner = ModelRunner(model, total_blocks, block_size, kv_cache_dtype, device, native_decoder)
            self.runner.kv_prefix = kv_prefix
        self.runner.sampler.generator = torch.Generator(device=device).manual_seed(seed)
        if draft_model is not None:
            draft_runner = ModelRunner(draft_model, total_blocks, block_size, kv_cache_dtype, device, native_decoder)
            self.spec = SpeculativeDecoder(draft_runner, num_speculative_tokens, num_blocks, max_num_seqs)
        self.grammars = GrammarCompiler(tokenizer, cfg.vocab_size)  # structured outputs' matchers
        self.stats = EngineStats()
        self._requests = {}  # request_id -> _Request, while unfinished
        self._seq_owner = {}  # seq_id -> (request, index)
        self._generators = {}  # seq_id -> generator, for seeded requests
        self._awaiting_first = {}  # seq_id -> request, for the sequences of requests not sampled yet
        self._num_stop_strings = 0  # unfinished requests with stop strings (detokenized every step)
        self._num_structured = 0  # unfinished requests with structured outputs (their grammars advance every step)
        self._next_request = 0
        self._next_seq = 0

    def close(self) -> None:
        """Ends the tensor-parallel workers, if any (also at exit); the engine takes no steps after."""
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _load_draft(self, draft, max_model_len):
        if not isinstance(draft, Transformer):
            from flashlm.io import load_model

            draft = load_model(draft, max_model_len=max_model_len).model
        if draft.cfg.vocab_size != self.model.cfg.vocab_size:
            raise ValueError(f"draft_model: its vocabulary ({draft.cfg.vocab_size}) must be the target's "
                             f"({self.model.cfg.vocab_size})")
        if draft.cfg.seq_len < self.max_model_len:
            raise ValueError(f"draft_model: its context ({draft.cfg.seq_len}) is shorter than max_model_len "
                             f"{self.max_model_len}")
        return draft

    def _blocks_with_scratch(self, num_blocks, k, block_size, max_num_seqs, kv_dtype, draft, device) -> int:
        """The cache blocks of the target and draft runners with speculative decoding: the block manager's, then
        each sequence's scratch blocks for k proposals. Checked against the memory the device has left, both
        caches together, before either is made."""
        total = num_blocks + max_num_seqs * scratch_blocks_per_seq(k, block_size)
        per_block = sum(kv_bytes_per_block(m, block_size, kv_dtype) for m in (self.model, draft))
        check_fits(total * per_block, "num_speculative_tokens", f"the KV caches of the target and draft models "
                   f"({total} blocks each: {num_blocks} and scratch for {k} proposals of {max_num_seqs} sequences)",
                   device)
        return total

    # ---- requests ---------------------------------------------------------------------------------------

    def add_request(self, prompt, params: Optional[SamplingParams] = None) -> int:
        """Queues a prompt (text, or a list of token ids); returns its request id."""
        params = _sampling_params(params)
        if self.tokenizer is None:
            _check_without_tokenizer(prompt, params)
        if isinstance(prompt, _ChatText):  # the template already holds the special tokens it wants
            text, ids = str(prompt), list(self.tokenizer.encode(str(prompt), add_special_tokens=False))
        elif isinstance(prompt, str):
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            text, ids = None, as_token_ids(prompt, "prompt", self.model.cfg.vocab_size)
        if self.virtual_ids and params.prompt_logprobs is not None:
            raise NotImplementedError("prompt_logprobs: not computed with a prompt- or prefix-tuning adapter")
        self._check_prompt_fits(self.virtual_ids + ids)  # the virtual tokens take room in the context too
        # Compiled before anything is queued: a schema the grammar library refuses fails here, never in a step.
        matcher = None if params.structured_outputs is None else self.grammars.matcher(params.structured_outputs)
        rid = self._next_request
        self._next_request += 1
        seqs, gens = [], {}
        for i in range(params.n):
            seq = Sequence(self._next_seq, self.virtual_ids + ids, params, len(self.virtual_ids))
            self._next_seq += 1
            if matcher is not None:  # one grammar state per sample
                seq.matcher = matcher if i == 0 else matcher.deep_copy()
            if params.seed is not None:  # sample i of a seeded request draws from seed + i (mod 2^64)
                gens[seq.seq_id] = torch.Generator(device=self.runner.device).manual_seed((params.seed + i) % 2**64)
            seqs.append(seq)
        if params.prompt_logprobs is not None:
            # The first sample computes them; the others may use the prefix cache.
            seqs[0].prompt_logprobs = [None] * _skipped_prompt_tokens(params, ids)
        req = _Request(rid, text, ids, params, seqs, gens)
        self._requests[rid] = req
        self._num_stop_strings += bool(params.stop)  # (undone by _release, as the entry above)
        self._num_structured += params.structured_outputs is not None
        self._generators.update(gens)
        for i, seq in enumerate(seqs):
            self._seq_owner[seq.seq_id] = (req, i)
            self._awaiting_first[seq.seq_id] = req
            self.scheduler.add(seq)
        return rid

    def _check_prompt_fits(self, ids) -> None:
        """A prompt the engine can run: not empty, and with room for one token more both within max_model_len
        and in the whole KV cache (a request that could never fit would wait forever)."""
        if not ids:
            raise ValueError("prompt: is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"{self.max_model_len}")
        bm = self.block_manager
        if len(ids) + 1 > bm.num_blocks * bm.block_size:
            raise ValueError(f"prompt: {len(ids)} tokens and one more do not fit the whole KV cache ({bm.num_blocks} "
                             f"blocks of {bm.block_size} tokens)")

    def abort_request(self, request_id: int) -> bool:
        """Ends a request now, waiting or running, and frees its KV blocks at once (its finish_reason becomes
        "abort"); a server calls it when a client goes away. Returns False for a request that has already
        finished or never existed."""
        req = self._requests.get(as_count(request_id, "request_id", 0))
        if req is None:
            return False
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        req.metrics.finished_time = time.perf_counter()
        self._release(req)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list:
        """Runs one scheduled step; returns the RequestOutputs of the requests that got new tokens."""
        return [req.output(self.tokenizer) for req in self._step(touched=True)]

    def _step(self, touched: bool = False) -> list:
        """step() without building its outputs (each decodes the request's whole text so far): the requests
        that got new tokens when `touched`, else nothing (generate() needs no list; making it costs a lookup
        per sequence). The rest of the work per sequence is the scheduler's and the sampler's, over arrays."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not len(batch):
            return []
        appended = self.scheduler.num_appended
        logprobs = None
        if self.spec is not None and self.spec.can_speculate(batch, self.block_manager, self.max_model_len):
            tokens = self.spec.run(batch, self.block_manager, self.runner, self._generators)
        else:
            step = self.runner.run(batch, self.block_manager, self._generators,
                                   mirror=self.spec.draft if self.spec is not None else None)
            tokens, logprobs = step.tokens, step.logprobs
        now = time.perf_counter()
        sampled = [seq for seq, s in zip(batch.seqs, batch.sampling) if s]
        tracked = logprobs is not None or self._num_structured > 0
        counts = [seq.num_output_tokens for seq in sampled] if tracked else None
        ended = self.scheduler.update(batch, tokens)
        if tracked:
            ended += self._record_kept(sampled, counts, logprobs)
        owner = self._seq_owner
        if self._awaiting_first:  # requests admitted since their first token: timed on their first sample
            for seq in sampled:
                req = self._awaiting_first.pop(seq.seq_id, None)
                if req is not None and req.metrics.first_token_time is None:
                    req.metrics.first_token_time = now
        if self._num_stop_strings:  # only the sequences of requests with stop strings are detokenized each step
            for seq in sampled:
                req, i = owner[seq.seq_id]
                if req.params.stop and self._detokenize(req, i, seq):
                    ended.append(seq)
        out = list({owner[seq.seq_id][0].request_id: owner[seq.seq_id][0] for seq in sampled}.values()) \
            if touched else []
        for seq in ended:
            req = owner[seq.seq_id][0] if seq.seq_id in owner else None
            if req is not None and req.finished:
                req.metrics.finished_time = now
                self._release(req)
        self.stats.steps += 1
        self.stats.computed_tokens += batch.num_tokens
        self.stats.output_tokens += self.scheduler.num_appended - appended
        self.stats.step_seconds += time.perf_counter() - start
        return out

    def _record_kept(self, sampled, counts, logprobs) -> list:
        """For each sampled sequence that kept its new token (max_tokens=0 keeps none): its logprobs, and its
        grammar advanced by it, the sequence finishing with "stop" when the grammar is complete. Returns the
        sequences it finished."""
        ended = []
        for j, (seq, count) in enumerate(zip(sampled, counts)):
            if seq.num_output_tokens == count:
                continue
            if logprobs is not None and logprobs[j] is not None:
                seq.logprobs.append(logprobs[j])
            if seq.matcher is not None and advance(seq.matcher, seq.token_ids[-1]):
                self.scheduler.finish(seq, "stop")
                ended.append(seq)
        return ended

    def stats_summary(self) -> dict:
        """Steps, tokens, and the host (Python) time per step beside the model's forward time."""
        forward = self.runner.forward_seconds + (self.spec.draft.forward_seconds if self.spec is not None else 0.0)
        out = self.stats.summary(forward)
        if self.spec is not None:
            out["spec_acceptance_rate"] = self.spec.acceptance_rate
        return out

    def _detokenize(self, req, i, seq) -> bool:
        """The text of sample i so far (a request with stop strings); a stop string ends it (and is cut from the
        text). Whether it ended."""
        text = self.tokenizer.decode(seq.output_ids)
        ended = False
        for stop in req.params.stop:
            pos = text.find(stop)
            if pos >= 0:
                text = text[:pos]
                self.scheduler.finish(seq, "stop")
                ended = True
        req.texts[i] = text
        return ended

    def _release(self, req) -> None:
        del self._requests[req.request_id]
        req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
        for seq in req.seqs:
            self._seq_owner.pop(seq.seq_id, None)
            self._generators.pop(seq.seq_id, None)
            self._awaiting_first.pop(seq.seq_id, None)
        self._num_stop_strings -= bool(req.params.stop)
        self._num_structured -= req.params.structured_outputs is not None

    # ---- front ends -------------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list:
        """One RequestOutput per prompt, in order. prompts: a string, a list of token ids, or a list of either;
        sampling_params: one SamplingParams for all, or one per prompt."""
        prompts = as_prompts(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
            params = [_sampling_params(p) for p in sampling_params]
        else:
            params = [_sampling_params(sampling_params)] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        reqs = [self._requests[i] for i in ids]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        # Followed by id: a request leaves self._requests when it finishes, so a step costs no pass over them all.
        pending = {r.request_id for r in reqs if not r.finished}
        while pending:
            done = pending.difference(self._requests)
            if not done:
                self._step()
                done = pending.difference(self._requests)
            pending -= done
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [r.output(self.tokenizer) for r in reqs]

    def stream(self, prompt, sampling_params: Optional[SamplingParams] = None) -> Iterator[RequestOutput]:
        """Yields the request's output each time it grows, the last one with finished=True. Other queued
        requests advance on the same steps."""
        rid = self.add_request(prompt, sampling_params)
        req = self._requests[rid]
        while not req.finished:
            for out in self.step():
                if out.request_id == rid:
                    yield out

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None) -> RequestOutput:
        """One reply to a conversation [{"role": ..., "content": ...}, ...] through the chat template."""
        prompt = _ChatText(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        rid = self.add_request(prompt, sampling_params)
        req = self._requests[rid]
        while not req.finished:
            self._step()
        return req.output(self.tokenizer)
