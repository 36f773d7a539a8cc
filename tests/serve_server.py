"""Test helper: a small random-weight GGUF model with a real tokenizer (a byte-level BPE trained here) and a chat
template, and flashlm's HTTP server for it running on 127.0.0.1 and an ephemeral port in a thread."""

import socket
import threading
import time

import torch

from hf_to_gguf import write_gguf
from tokenizer_sources import bpe_gguf_metadata, train_bpe

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MODEL_NAME = "tiny-llama"


def write_model(path: str, chat_template=CHAT_TEMPLATE, context_length: int = 256):
    """A 2-layer llama (hidden 64) with a 600-token BPE vocabulary, as F32 GGUF; returns the transformers
    model it wrote (the tests' independent reference for logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe("gpt-2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=context_length)).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    write_gguf(model, "llama", path, "F32", tokenizer_meta=bpe_gguf_metadata(tok, "gpt-2", chat_template=chat_template))
    return model


class RunningServer:
    """uvicorn serving create_app(llm) in a thread; .url is its base URL. Use as a context manager."""

    def __init__(self, llm, api_key=None, name=MODEL_NAME):
        import uvicorn

        from flashlm.serve.app import create_app

        self.app = create_app(llm, name, api_key=api_key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def engine_state(self) -> dict:
        """Requests the engine holds and KV blocks in use, read on the engine thread."""
        def read(llm):
            bm = llm.block_manager
            return {"requests": llm.has_unfinished_requests(), "running": len(llm.scheduler.running),
                    "waiting": len(llm.scheduler.waiting), "blocks_used": bm.num_blocks - bm.num_free_blocks,
                    "preemptions": llm.scheduler.num_preemptions}
        return self.app.state.server.engine.call(read).result(timeout=30)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The engine state once no request is left (aborts reach the engine between steps)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine_state()
            if not state["requests"] or time.monotonic() > deadline:
                return state
            time.sleep(0.05)
