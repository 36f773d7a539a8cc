"""`flashlm serve MODEL`: load a model into an LLM and serve it over HTTP (wired in flashlm.cli).

    flashlm serve model.gguf --port 8000 --api-key secret --max-num-seqs 32 --kv-cache-memory 512MiB
"""

import os
import sys

from flashlm.runtime.commands import LORA_HELP, TENSOR_PARALLEL_HELP


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (completions, chat, "
                                     "streaming, metrics, a chat page at /)")
    p.add_argument("model", help="a GGUF file, an HF model directory or a training run folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("FLASHLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $FLASHLM_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the file or folder name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 512MiB (default: room for every "
                                                           "sequence at full length, at most 1 GiB)")
    p.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16"), default=None,
                   help="KV cache dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--lora", default=None, metavar="PATH", help=LORA_HELP)
    p.add_argument("--draft-model", default=None, help="a smaller model of the same vocabulary (speculative decoding)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="the engine's seed for unseeded requests")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help=TENSOR_PARALLEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def served_name(model: str) -> str:
    """The model's name by default: its file name without .gguf, or its folder's name."""
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise NotImplementedError("serve: needs the server's packages: pip install 'flashlm[serve]'") from None
    import torch

    from flashlm.runtime.engine import LLM
    from flashlm.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"port: must be in [0, 65535], got {args.port}")
    kv_dtype = getattr(torch, args.kv_cache_dtype) if args.kv_cache_dtype else None
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
              enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
              kv_cache_dtype=kv_dtype, seed=args.seed, device=args.device, draft_model=args.draft_model,
              num_speculative_tokens=args.num_speculative_tokens, lora=args.lora,
              tensor_parallel_size=args.tensor_parallel_size)
    with llm:  # ends the tensor-parallel workers when the server stops
        name = args.served_model_name or served_name(args.model)
        app = create_app(llm, name, api_key=args.api_key)
        print(f"flashlm: serving {name} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /)",
              file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
