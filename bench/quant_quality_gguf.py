"""The GGUF rows of compare_quant_quality: the float model written to a GGUF file, quantized with flashlm's
`quantize_file` (a mix, with or without an importance matrix that flashlm collects from the calibration text),
and the perplexity of each file by flashlm (load_model: GGUFLinear layers) and by llama.cpp (llama-cpp-python,
the same token windows fed as ids, the same tokens scored).

The model's vocabulary is its 256 bytes plus one merged token (a GGUF BPE vocabulary needs a merge), so token
ids are byte values for both runtimes and no tokenizer stands between them.
"""

import math
import os
import time

import numpy as np
import torch

from flashlm.io import load_model
from flashlm.io.quantize_file import quantize_file
from flashlm.quant.calibrate import token_batches
from flashlm.quant.imatrix import collect_imatrix, write_imatrix
from flashlm.quant.sensitivity import perplexity
from flashlm.runtime.token_bytes import _bytes_to_unicode
from flashlm.train.export import export_gguf

VOCAB = 257  # 256 bytes + " t"


def byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)} | {table[32] + table[116]: 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(table[32], table[116])]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def llama_cpp_perplexity(path: str, ids: torch.Tensor, seq: int):
    """llama.cpp's perplexity of the GGUF file over the rows of `ids` that `perplexity` scores, or None
    without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    ref = llama_cpp.Llama(path, n_ctx=seq, n_batch=seq, n_threads=torch.get_num_threads(), logits_all=True,
                          type_k=0, type_v=0, verbose=False)  # float32 KV cache
    nll, count = 0.0, 0
    try:
        for batch in token_batches(ids, seq, 8):
            for row in batch.tolist():
                ref.reset()
                ref.eval(row)
                logits = np.asarray(ref.scores[: seq - 1], dtype=np.float64)
                top = logits.max(axis=1)
                lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
                nll += float((lse - logits[np.arange(seq - 1), row[1:]]).sum())
                count += seq - 1
    finally:
        ref.close()
    return math.exp(nll / count)


def gguf_rows(model, cfg, calib_ids, held_out, seq: int, mixes, folder: str) -> list:
    """[(row name, flashlm perplexity, llama.cpp perplexity or None, seconds to quantize)] for each mix, without
    and with an imatrix."""
    src = os.path.join(folder, "float.gguf")
    export_gguf(model, cfg, byte_tokenizer_json(), src, eos_token_id=0)
    imatrix = os.path.join(folder, "imatrix.gguf")
    write_imatrix(collect_imatrix(model, calib_ids, chunk_size=seq, dataset="calibration"), imatrix)
    rows = []
    for mix in mixes:
        for im in (None, imatrix):
            out = os.path.join(folder, f"{mix}{'-imatrix' if im else ''}.gguf")
            t0 = time.perf_counter()
            quantize_file(src, out, mix, progress=False, imatrix=im)
            seconds = time.perf_counter() - t0
            ours = perplexity(load_model(out).model, held_out, seq)
            rows.append((f"gguf {mix}{' imatrix' if im else ''}", ours, llama_cpp_perplexity(out, held_out, seq),
                         seconds))
    return rows
