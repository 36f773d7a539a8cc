"""The HTTP server: OpenAI's completions and chat APIs (streaming, logprobs, structured output), vLLM's
tokenize/detokenize, Prometheus metrics and a chat page, over one engine loop that batches every client
together. `flashlm serve MODEL` runs it; flashlm.serve.app.create_app(llm, name) builds the ASGI app.

Importing this package loads nothing: its modules need the `serve` extra (fastapi, uvicorn, prometheus-client).
"""
