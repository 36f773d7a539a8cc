"""FlashLM: flashlm's engine as an lm-evaluation-harness model backend, registered under the name "flashlm".

    import flashlm.eval.lm_eval_model  # registers "flashlm" with lm_eval
    lm_eval.simple_evaluate(model="flashlm", model_args="model=model.gguf", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=FlashLM(llm=LLM("hf-dir")), tasks=[...])          # an engine already made

    python -m flashlm.eval.lm_eval_model run --model flashlm --model_args model=model.gguf --tasks hellaswag

lm_eval has no plugin discovery for models, so its own `lm_eval` command knows "flashlm" only once this module
is imported; `python -m flashlm.eval.lm_eval_model` is lm_eval's command line with it imported.

lm_eval's three primitives run on the engine, each batched across all requests of a call:
- loglikelihood: lm_eval's TemplateLM splits each (context, continuation) into tokens as its `hf` backend does
  (encode the whole, take the continuation's tokens after the context's; an empty context becomes the prefix
  token); the pairs are scored by flashlm.eval.loglikelihood (the shared context's KV cache computed once).
- loglikelihood_rolling: the whole text's log-likelihood over disjoint windows of max_length tokens
  (flashlm.eval.perplexity.rolling_loglikelihood, lm_eval's get_rolling_token_windows).
- generate_until: greedy or sampled generation with lm_eval's generation kwargs (until, max_gen_toks,
  do_sample, temperature, top_p, top_k), the context left-truncated to max_length - max_gen_toks as `hf` does.
"""

import logging
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from flashlm.runtime.checks import as_count, as_float, as_optional_count
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default for generate_until when a task gives none
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm_eval's command line passes as device when none is given
# Generation kwargs passed on to SamplingParams as they are (its checks name a bad one).
SAMPLING_KWARGS = ("top_p", "top_k", "min_p", "repetition_penalty", "seed")


@register_model("flashlm")
class FlashLM(TemplateLM):
    def __init__(self, model=None, llm: Optional[LLM] = None, max_length: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: Optional[int] = None, prefix_token_id: Optional[int] = None, device=None,
                 seed: int = 0, batch_size=None, max_batch_size=None):
        """model: a GGUF file, an HF directory or a training run folder (or llm: an LLM already made). max_length:
        the most tokens one forward sees (default: the longest prompt the engine takes and one more to score).
        batch_size and max_batch_size are lm_eval's and unused: the engine batches up to max_num_seqs."""
        super().__init__()
        if (model is None) == (llm is None):
            raise ValueError("model: give either model (a path) or llm (an LLM), not both or neither")
        self.max_gen_toks = as_count(max_gen_toks, "max_gen_toks")  # the cheap checks before a model loads
        max_length = as_optional_count(max_length, "max_length")
        if llm is None:
            llm = LLM(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      max_model_len=max_model_len, seed=seed, device=_device(device))
        elif not isinstance(llm, LLM):
            raise TypeError(f"llm: expected a flashlm LLM, got {type(llm).__name__}")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        # A prompt of n tokens needs n < max_model_len (room for one more); a window of max_length inputs is
        # max_length + 1 tokens with the last one scored, so max_length + 1 <= max_model_len - 1.
        longest = llm.max_model_len - 2
        if longest < 1:
            raise ValueError(f"model: its context ({llm.max_model_len} tokens) is too short to score anything")
        self.max_length = as_count(longest if max_length is None else max_length, "max_length", 1, longest)
        vocab = llm.model.cfg.vocab_size
        self._prefix_token_id = as_optional_count(prefix_token_id, "prefix_token_id", 0, vocab - 1)
        if self.prefix_token_id is None:
            raise ValueError("prefix_token_id: the tokenizer has no BOS or end-of-text token, so give one")

    # ---- tokens -----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes (as lm_eval's hf backend: BOS if the tokenizer has one, else EOT)."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list:
        """The tokenizer's own special tokens (BOS where the model wants it) unless asked otherwise, and none
        when the text already starts with the BOS text (as lm_eval's hf backend)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- the three primitives ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request
        ((context, continuation), context_ids, continuation_ids); a context too long for max_length is cut on
        the left as the hf backend cuts it (the continuation and the max_length tokens before its last)."""
        from flashlm.eval.loglikelihood import loglikelihoods

        pairs = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("continuation: is empty (it has no tokens to score)")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation: {len(continuation)} tokens do not fit max_length {self.max_length}")
            keep = self.max_length + 1 - len(continuation)
            pairs.append((list(context)[-keep:], list(continuation)))
        return loglikelihoods(self.llm, pairs, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """The log-likelihood of each whole text: windows of max_length tokens, the first after the prefix
        token, each scoring only tokens no earlier window scored."""
        from flashlm.eval.perplexity import rolling_loglikelihood

        return [rolling_loglikelihood(self.llm, self.tok_encode(string), self.max_length, self.prefix_token_id)
                for (string,) in (req.args for req in requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """The text each request's context continues with, cut at the first of its stop strings (and the
        end-of-text token's text); all requests batched through the engine."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False) if self.eot_token_id is not None \
            else None
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            prompt, sp, until = self._generation_request(context, gen_kwargs, eos)
            prompts.append(prompt)
            params.append(sp)
            stops.append(until)
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm) if prompts else []
        return [postprocess_generated_text(out.outputs[0].text, until, None) for out, until in zip(outs, stops)]

    def _generation_request(self, context: str, gen_kwargs: dict, eos: Optional[str]):
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"gen_kwargs: expected a dict, got {type(gen_kwargs).__name__}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
        max_gen_toks = as_count(kwargs.pop("max_gen_toks"), "max_gen_toks")
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks: {max_gen_toks} leaves no room for a context within max_length "
                             f"{self.max_length}")
        do_sample = kwargs.pop("do_sample", False)
        temperature = as_float(kwargs.pop("temperature", 0.0), "temperature")  # normalize_gen_kwargs: 0 unless sampled
        sampling = {"temperature": temperature if do_sample else 0.0}
        for name in SAMPLING_KWARGS:
            if kwargs.get(name) is not None:
                sampling[name] = kwargs.pop(name)
        if kwargs:  # a setting the engine would not follow: refused rather than ignored
            raise ValueError(f"gen_kwargs: {sorted(kwargs)} not supported (flashlm takes until, max_gen_toks, "
                             f"do_sample, temperature and {', '.join(SAMPLING_KWARGS)})")
        ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
        return ids, SamplingParams(max_tokens=max_gen_toks, stop=until, **sampling), until

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return "flashlm"

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None


def _device(device) -> str:
    """lm_eval passes device=None from Python unless asked, and "cuda:0" from its command line unless asked
    (its default): either means the GPU where torch sees one and the CPU otherwise, as for lm_eval's hf backend.
    Any other device is the engine's to check."""
    import torch

    if device is None or (device == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available()):
        if device is not None:
            logging.getLogger(__name__).warning("device: %s asked, but torch sees no CUDA device; using cpu", device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


if __name__ == "__main__":  # lm_eval's command line, with "flashlm" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
