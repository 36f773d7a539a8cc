"""The runtime called as a hostile user would: BlockManager's construction and calls, LLM's construction
(flashlm.LLM over the tiny GGUF llama of tests/robust_models.py), SamplingParams and LLM.generate, one
argument changed at a time, each in a forked child under a memory cap and a timeout (tests/robust.py).

A count taken from the caller (num_blocks, max_num_seqs, kv_cache_memory, num_speculative_tokens, n) is
either honoured within the child's limits or refused by name: never a hang or a huge allocation. An LLM that
is built must also generate: two greedy tokens of the prompt [1, 2, 3], each an id of the vocabulary.
"""

import math
import os

import torch

import robust
import robust_models as rm
from robust import Case, value_case
from robust_args import WRAP


def warm():
    import flashlm.io.gguf_model  # noqa: F401
    import flashlm.runtime.engine  # noqa: F401
    import tokenizers  # noqa: F401


def gguf_path(**kw) -> str:
    path = os.path.join(robust.scratch(), "model.gguf")
    with open(path, "wb") as f:
        f.write(rm.gguf_model(**kw))
    return path


# -- BlockManager ----------------------------------------------------------------------------------------------

def block_manager(*args, **kw):
    from flashlm.runtime.block_manager import BlockManager

    return BlockManager(*args, **kw)


def has_blocks(n):
    def check(bm):
        return None if bm.num_free_blocks == n else f"num_free_blocks {bm.num_free_blocks}, expected {n}"
    return check


def with_sequence():
    """A manager of 8 blocks of 4 tokens holding sequence 0 (6 tokens)."""
    bm = block_manager(8, 4)
    bm.allocate(0, list(range(6)))
    return bm


def block_manager_cases():
    entry = "BlockManager()"
    cases = [value_case(entry, "a valid call (8, 4)", lambda: block_manager(8, 4), (), has_blocks(8))]
    for arg, valid in (("num_blocks", 8), ("block_size", 4), ("max_blocks_per_seq", 2)):
        for label, value, expect in (("0", 0, "raise"), ("-1", -1, "raise"), ("2.5", 2.5, "raise"),
                                     ("'8'", "8", "raise"), ("None", None, "raise" if arg != "max_blocks_per_seq" else None),
                                     ("2**31", 1 << 31, "either"), ("2**63", 1 << 63, "either")):
            if expect is None:
                continue
            kw = {"num_blocks": 8, "block_size": 4, arg: value}
            call = lambda kw=kw: block_manager(**kw)  # noqa: E731
            names = (arg,)
            if expect == "raise":
                cases.append(Case(entry, f"{arg}: {label}", call, names))
            else:
                n = value if arg == "num_blocks" else 8
                cases.append(value_case(entry, f"{arg}: {label}", call, names, has_blocks(n)))
    calls = "BlockManager"
    seq = ("seq_id", "sequence")
    unknown = dict(accept=(KeyError,))  # an unknown sequence id: KeyError is the lookup's own error
    cases += [
        Case(f"{calls}.allocate", "token_ids: an id 2**63", lambda: with_sequence().allocate(1, [1, 1 << 63]),
             ("token_ids", "token id")),
        Case(f"{calls}.allocate", "token_ids: an id -1", lambda: with_sequence().allocate(1, [1, -1]),
             ("token_ids", "token id")),
        Case(f"{calls}.allocate", "token_ids: an id 1.5", lambda: with_sequence().allocate(1, [1, 1.5]),
             ("token_ids", "token id")),
        Case(f"{calls}.allocate", "token_ids: a string", lambda: with_sequence().allocate(1, "abc"),
             ("token_ids",)),
        Case(f"{calls}.allocate", "token_ids: empty", lambda: with_sequence().allocate(1, []), ("token_ids",)),
        Case(f"{calls}.allocate", "token_ids: None", lambda: with_sequence().allocate(1, None), ("token_ids",)),
        Case(f"{calls}.allocate", "seq_id: already allocated", lambda: with_sequence().allocate(0, [1, 2]), seq),
        Case(f"{calls}.allocate", "seq_id: None", lambda: with_sequence().allocate(None, [1, 2]), seq),
        Case(f"{calls}.allocate", "seq_id: a list", lambda: with_sequence().allocate([1], [1, 2]), seq),
        Case(f"{calls}.slot_mapping", "start: -1", lambda: with_sequence().slot_mapping(0, -1, 2), ("start", "slot range")),
        Case(f"{calls}.slot_mapping", "end: 7 (the sequence has 6 tokens)", lambda: with_sequence().slot_mapping(0, 0, 7),
             ("end", "slot range")),
        Case(f"{calls}.slot_mapping", "start > end", lambda: with_sequence().slot_mapping(0, 5, 2), ("start", "end",
                                                                                                    "slot range")),
        Case(f"{calls}.slot_mapping", "end: 2**63", lambda: with_sequence().slot_mapping(0, 0, 1 << 63),
             ("end", "slot range")),
        Case(f"{calls}.slot_mapping", "seq_id: unknown", lambda: with_sequence().slot_mapping(9, 0, 1), seq, **unknown),
        Case(f"{calls}.block_tables_tensor", "seq_ids: an unknown id", lambda: with_sequence().block_tables_tensor([0, 9]),
             seq + ("seq_ids",), **unknown),
        Case(f"{calls}.block_tables_tensor", "max_blocks: 1 (sequence 0 has 2)",
             lambda: with_sequence().block_tables_tensor([0], 1), ("max_blocks",)),
        value_case(f"{calls}.block_tables_tensor", "max_blocks: 2**31",
               lambda: with_sequence().block_tables_tensor([0], 1 << 31), ("max_blocks",),
               lambda t: f"returned a table of {t.numel()} entries" if isinstance(t, torch.Tensor) and t.numel() > 1 << 20
               else None),
        Case(f"{calls}.block_tables_tensor", "max_blocks: -1", lambda: with_sequence().block_tables_tensor([0], -1),
             ("max_blocks",)),
        Case(f"{calls}.append", "token_ids: fewer than held", lambda: with_sequence().append(0, [1, 2]),
             ("token_ids",)),
        Case(f"{calls}.append", "token_ids: an id 2**63", lambda: with_sequence().append(0, list(range(6)) + [1 << 63]),
             ("token_ids", "token id")),
        Case(f"{calls}.append", "num_new_tokens: 0", lambda: with_sequence().append(0, list(range(7)), 0),
             ("num_new_tokens",)),
        Case(f"{calls}.append", "num_new_tokens: 2**31", lambda: with_sequence().append(0, list(range(7)), 1 << 31),
             ("num_new_tokens", "token_ids")),
        Case(f"{calls}.append", "seq_id: unknown", lambda: with_sequence().append(9, [1, 2]), seq, **unknown),
        Case(f"{calls}.fork", "parent_id: unknown", lambda: with_sequence().fork(9, 1), ("parent_id", "sequence"),
             **unknown),
        Case(f"{calls}.fork", "child_id: the parent's", lambda: with_sequence().fork(0, 0), ("child_id", "sequence")),
        Case(f"{calls}.free", "seq_id: unknown", lambda: with_sequence().free(9), seq, **unknown),
        Case(f"{calls}.can_allocate", "prompt: -5", lambda: with_sequence().can_allocate(-5), ("prompt",)),
        value_case(f"{calls}.can_allocate", "prompt: 2**63 tokens", lambda: with_sequence().can_allocate(1 << 63),
               ("prompt",), lambda r: None if r is False else f"returned {r!r}, expected False"),
        Case(f"{calls}.can_append", "num_new_tokens: 0", lambda: with_sequence().can_append(0, 0), ("num_new_tokens",)),
    ]
    return cases


# -- LLM construction and generation ---------------------------------------------------------------------------

def llm(path=None, **kw):
    from flashlm.runtime.engine import LLM

    return LLM(path or gguf_path(), **kw)


def generates(llm_or_outcome):
    """None if the engine generates two greedy tokens of the vocabulary from [1, 2, 3], else what went wrong."""
    from flashlm.runtime.sampling_params import SamplingParams

    try:
        out = llm_or_outcome.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    except Exception as e:  # noqa: BLE001 - an engine that was built must run
        return f"built an LLM that cannot generate: {type(e).__name__}: {robust.short(e)}"
    ids = out[0].outputs[0].token_ids
    if len(ids) != 2 or not all(0 <= i < rm.GGUF_VOCAB for i in ids):
        return f"generated {ids!r}, expected two ids in [0, {rm.GGUF_VOCAB})"
    return None


LLM_KWARGS = [
    # (argument, label, value, expect)
    ("max_num_seqs", "0", 0, "raise"), ("max_num_seqs", "-1", -1, "raise"), ("max_num_seqs", "2**31", 1 << 31, "either"),
    ("max_num_seqs", "2**63", 1 << 63, "either"), ("max_num_seqs", "'4'", "4", "raise"),
    ("max_num_seqs", "2.5", 2.5, "raise"),
    ("max_num_batched_tokens", "0", 0, "raise"), ("max_num_batched_tokens", "-1", -1, "raise"),
    ("max_num_batched_tokens", "2**63", 1 << 63, "either"),
    ("kv_cache_memory", "'abc'", "abc", "raise"), ("kv_cache_memory", "'-1GiB'", "-1GiB", "raise"),
    ("kv_cache_memory", "'1e30GiB'", "1e30GiB", "raise"), ("kv_cache_memory", "2**63", 1 << 63, "raise"),
    ("kv_cache_memory", "'1KiB' (less than one sequence)", "1KiB", "raise"), ("kv_cache_memory", "0", 0, "raise"),
    ("kv_cache_memory", "nan", math.nan, "raise"), ("kv_cache_memory", "'64MiB'", "64MiB", "either"),
    ("block_size", "0", 0, "raise"), ("block_size", "-1", -1, "raise"), ("block_size", "2**31", 1 << 31, "raise"),
    ("block_size", "3", 3, "either"), ("block_size", "'16'", "16", "raise"),
    ("max_model_len", "0", 0, "raise"), ("max_model_len", "-1", -1, "raise"), ("max_model_len", "2**31", 1 << 31, "either"),
    ("max_model_len", "'64'", "64", "raise"), ("max_model_len", "8", 8, "either"),
    ("kv_cache_dtype", "torch.int8", torch.int8, "raise"), ("kv_cache_dtype", "torch.float64", torch.float64, "either"),
    ("kv_cache_dtype", "'float32' (a string)", "float32", "raise"), ("kv_cache_dtype", "torch.bfloat16", torch.bfloat16,
                                                                    "either"),
    ("seed", "-1", -1, "either"), ("seed", "2**64", 1 << 64, "raise"), ("seed", "'x'", "x", "raise"),
    ("device", "'meta'", "meta", "raise"), ("device", "'cuda' (no GPU here)", "cuda", "raise"),
    ("device", "'tpu'", "tpu", "raise"),
    ("num_speculative_tokens", "0 (with a draft)", 0, "raise"), ("num_speculative_tokens", "-1 (with a draft)", -1, "raise"),
    ("num_speculative_tokens", "2**31 (with a draft)", 1 << 31, "raise"),
    ("enable_prefix_caching", "'no' (a string)", "no", "raise"),
]


def llm_cases():
    entry = "flashlm.LLM()"
    cases = [value_case(entry, "a valid call", lambda: llm(), (), generates)]
    for arg, label, value, expect in LLM_KWARGS:
        def call(arg=arg, value=value):
            kw = {arg: value}
            if arg == "num_speculative_tokens":
                path = gguf_path()
                kw["draft_model"] = path
                return llm(path, **kw)
            return llm(**kw)
        if expect == "raise":
            cases.append(Case(entry, f"{arg}: {label}", call, (arg,)))
        else:
            cases.append(value_case(entry, f"{arg}: {label}", call, (arg,), generates))
    cases += [
        Case(entry, "model: a missing path", lambda: llm(os.path.join(robust.scratch(), "missing.gguf")), ("path", "model")),
        Case(entry, "model: None", lambda: llm_none(), ("model",)),
        Case(entry, "model: an int", lambda: llm(3), ("model", "path")),
        Case(entry, "model: a GGUF file whose block_count is 2**31",
             lambda: llm(gguf_path(meta={"llama.block_count": (rm.gb.UINT32, 1 << 31)})), ("llama.block_count",)),
        Case(entry, "draft_model: a missing path",
             lambda: llm(draft_model=os.path.join(robust.scratch(), "missing.gguf")), ("draft_model", "path")),
        Case(entry, "draft_model: another vocabulary (301 tokens)", lambda: llm(draft_model=gguf_path(
            tensors={"token_embd.weight": ((rm.D, 301), rm.gb.F32, bytes(4 * rm.D * 301)),
                     "output.weight": ((rm.D, 301), rm.gb.F32, bytes(4 * rm.D * 301))},
            meta={"tokenizer.ggml.tokens": None, "tokenizer.ggml.token_type": None, "tokenizer.ggml.merges": None})),
             ("draft_model",)),
    ]
    return cases


def llm_none():
    from flashlm.runtime.engine import LLM

    return LLM(None)


def sampling_params(**kw):
    from flashlm.runtime.sampling_params import SamplingParams

    return SamplingParams(**kw)


def generate_with(prompt=(1, 2, 3), **kw):
    """LLM.generate of `prompt` with SamplingParams(**kw): the output token lists."""
    from flashlm.runtime.sampling_params import SamplingParams

    out = llm().generate([list(prompt)] if isinstance(prompt, tuple) else prompt, SamplingParams(**kw))
    return [o.outputs[0].token_ids for o in out]


def within_context(outputs):
    """A check of generate's result: lists of ids of the vocabulary, no longer than the context."""
    if not isinstance(outputs, list) or not all(isinstance(ids, list) for ids in outputs):
        return f"returned {outputs!r}"
    for ids in outputs:
        if len(ids) > rm.CONTEXT or not all(0 <= i < rm.GGUF_VOCAB for i in ids):
            return f"generated {len(ids)} ids (some outside the vocabulary or past the context of {rm.CONTEXT})"
    return None


def sampling_cases():
    entry = "flashlm.SamplingParams()"
    cases = []
    for arg, label, value in (("temperature", "nan", math.nan), ("temperature", "-1", -1.0), ("top_p", "nan", math.nan),
                              ("top_p", "0", 0.0), ("top_k", "-2", -2), ("top_k", "2.5", 2.5), ("min_p", "nan", math.nan),
                              ("repetition_penalty", "nan", math.nan), ("repetition_penalty", "0", 0.0),
                              ("presence_penalty", "nan", math.nan), ("max_tokens", "-1", -1), ("max_tokens", "1.5", 1.5),
                              ("n", "0", 0), ("n", "'2'", "2"), ("stop", "['']", [""]), ("stop", "[None]", [None]),
                              ("stop_token_ids", "[-1]", [-1]), ("stop_token_ids", "'abc'", "abc"),
                              ("seed", "1.5", 1.5), ("temperature", "'hot'", "hot")):
        cases.append(Case(entry, f"{arg}: {label}", lambda arg=arg, value=value: sampling_params(**{arg: value}),
                          (arg,)))
    gen = "flashlm.LLM.generate"
    cases += [
        value_case(gen, "a valid call", lambda: generate_with(temperature=0, max_tokens=3), (), within_context),
        Case(gen, f"prompt: an id {rm.GGUF_VOCAB} (the vocabulary has {rm.GGUF_VOCAB})",
             lambda: generate_with((1, rm.GGUF_VOCAB, 2), max_tokens=2), ("prompt",)),
        Case(gen, "prompt: an id -1", lambda: generate_with((1, -1, 2), max_tokens=2), ("prompt",)),
        Case(gen, "prompt: an id 2 + 2**32", lambda: generate_with((1, 2 + WRAP), max_tokens=2), ("prompt",)),
        Case(gen, "prompt: an id 2**63", lambda: generate_with((1, 1 << 63), max_tokens=2), ("prompt",)),
        Case(gen, "prompt: an id 1.5", lambda: generate_with((1, 1.5), max_tokens=2), ("prompt",)),
        Case(gen, "prompt: empty", lambda: generate_with((), max_tokens=2), ("prompt",)),
        Case(gen, f"prompt: {rm.CONTEXT} tokens (the context is {rm.CONTEXT})",
             lambda: generate_with(tuple([1] * rm.CONTEXT), max_tokens=2), ("prompt", "max_model_len")),
        Case(gen, "prompt: a dict", lambda: generate_with({"a": 1}, max_tokens=2), ("prompt", "prompts")),
        Case(gen, "prompt: None", lambda: generate_with(None, max_tokens=2), ("prompt", "prompts")),
        value_case(gen, "max_tokens: 2**31 (the context bounds it)",
               lambda: generate_with(temperature=0, max_tokens=1 << 31, ignore_eos=True), ("max_tokens",),
               within_context),
        value_case(gen, "max_tokens: None (until the context is full)",
               lambda: generate_with(temperature=0, max_tokens=None, ignore_eos=True), ("max_tokens",), within_context),
        value_case(gen, "seed: 2**64", lambda: generate_with(seed=1 << 64, max_tokens=2), ("seed",), within_context),
        value_case(gen, "seed: -1", lambda: generate_with(seed=-1, max_tokens=2), ("seed",), within_context),
        value_case(gen, "top_k: 2**63", lambda: generate_with(top_k=1 << 63, max_tokens=2), ("top_k",), within_context),
        value_case(gen, "stop_token_ids: [2**64]", lambda: generate_with(stop_token_ids=[1 << 64], max_tokens=2),
               ("stop_token_ids",), within_context),
        value_case(gen, "n: 2**31", lambda: generate_with(n=1 << 31, max_tokens=2), ("n",), within_context),
        value_case(gen, "n: 3", lambda: generate_with(n=3, max_tokens=2), ("n",), within_context),
        value_case(gen, "temperature: 1e-30 (greedy)", lambda: generate_with(temperature=1e-30, max_tokens=2),
               ("temperature",), within_context),
        value_case(gen, "temperature: 1e30", lambda: generate_with(temperature=1e30, max_tokens=2), ("temperature",),
               within_context),
        value_case(gen, "repetition_penalty: 1e30", lambda: generate_with(repetition_penalty=1e30, max_tokens=2),
               ("repetition_penalty",), within_context),
    ]
    return cases


CASES = block_manager_cases() + llm_cases() + sampling_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
