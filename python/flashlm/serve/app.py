"""The OpenAI-compatible HTTP server: a FastAPI app over one EngineLoop.

    app = create_app(LLM("model.gguf"), model_name="my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or `flashlm serve model.gguf`

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize,
GET /health, GET /metrics (Prometheus), GET / (a chat page). Every refusal is OpenAI's error object
{"error": {"message", "type", "param", "code"}} with a 4xx status: malformed JSON and fields of the wrong type
are 400s naming the field (not FastAPI's 422), a wrong or missing API key 401, an unknown model 404.
"""

import hmac
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from flashlm.serve.chat import chat_prompt_ids
from flashlm.serve.completions import create_chat_completion, create_completion
from flashlm.serve.engine_loop import EngineLoop
from flashlm.serve.metrics import ServerMetrics
from flashlm.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest)
from flashlm.serve.responses import now

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


class Server:
    """What the routes share: the engine loop, the tokenizer, the served name, the metrics."""

    def __init__(self, llm, model_name: str, api_key: Optional[str] = None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.created = now()
        self.metrics = ServerMetrics(model_name)
        self.engine = EngineLoop(llm, self.metrics)

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model: the model `{model[:200]}` does not exist (this server serves "
                                f"`{self.model_name}`)", param="model", code="model_not_found")

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer KEY`)",
                           code="invalid_api_key")


def _param_of(loc) -> Optional[str]:
    """The field a pydantic error's location names: ("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    text = str(parts[0])
    for p in parts[1:]:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text


def _validation_error(e: RequestValidationError) -> APIError:
    err = e.errors()[0] if e.errors() else {}
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg', '')}")
    param = _param_of(err.get("loc", ()))
    return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param)


def create_app(llm, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    server = Server(llm, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="flashlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        err = _validation_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        err = APIError(e.status_code, str(e.detail), type="invalid_request_error")
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # a bug in flashlm: still an error object, not a bare 500
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorized(request: Request) -> None:
        server.check_api_key(request)

    auth = [Depends(authorized)]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(server, body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(server, body, request)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "flashlm", "max_model_len": llm.max_model_len}]}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = chat_prompt_ids(server.tokenizer, body.messages, body.add_generation_prompt)
        else:
            ids = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": list(ids)}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        vocab = llm.model.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[:4]} outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/")
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    return app
