"""Test helper for lm-evaluation-harness interop: a small random-weight HF llama directory (a byte-level BPE
trained here as tokenizer.json) that transformers, lm-eval's `hf` backend and flashlm all load, and lm-eval
task YAMLs over local JSONL files (multiple choice, rolling log-likelihood, generation) written beside it."""

import json
from pathlib import Path

import torch

from tokenizer_sources import train_bpe

MC_TASK, ROLLING_TASK, GEN_TASK = "flashlm_mc", "flashlm_rolling", "flashlm_gen"

# Multiple-choice items: choices of different token lengths, so acc and acc_norm can differ.
MC_ITEMS = [
    {"question": "the quick brown fox", "choices": ["jumps", "over the lazy dog", "cache", "model weight"],
     "answer": 1},
    {"question": "hello world", "choices": ["attention", "layer", "token model", "we'll see"], "answer": 0},
    {"question": "Über café naïve", "choices": ["12345", "3.14", "brown", "fox jumps high"], "answer": 2},
    {"question": "attention cache", "choices": ["the", "quick brown", "lazy", "dog"], "answer": 3},
    {"question": "token model weight layer", "choices": ["hello", "world", "over", "the quick brown fox"], "answer": 1},
    {"question": "we'll see", "choices": ["fox", "cache attention", "weight", "model"], "answer": 0},
]
ROLLING_DOCS = ["the quick brown fox jumps over the lazy dog " * 6, "hello world, attention cache model",
                "token model weight layer\n" * 12]
GEN_ITEMS = [{"question": "the quick brown", "answer": "fox"}, {"question": "hello", "answer": "world"},
             {"question": "attention", "answer": "cache"}, {"question": "lazy dog", "answer": "over"}]


def write_hf_model(path: Path, max_positions: int = 512):
    """A 2-layer llama (hidden 64) with a 600-token BPE vocabulary as an HF directory (float32 safetensors,
    tokenizer.json, tokenizer_config.json); returns the transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe("gpt-2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0)).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": max_positions}))
    return model


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _dataset(path: Path) -> str:
    return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
            f"test_split: test\n")


def write_tasks(folder: Path) -> Path:
    """The three task YAMLs and their JSONL files in folder (lm-eval's include_path); returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    mc, rolling, gen = (folder / n for n in ("mc.jsonl", "rolling.jsonl", "gen.jsonl"))
    _jsonl(mc, MC_ITEMS)
    _jsonl(rolling, [{"text": t} for t in ROLLING_DOCS])
    _jsonl(gen, GEN_ITEMS)
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n" + _dataset(mc) +
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / f"{ROLLING_TASK}.yaml").write_text(
        f"task: {ROLLING_TASK}\n" + _dataset(rolling) +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n" + _dataset(gen) +
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder
