"""The live endpoint: an OpenAI-style FastAPI app over a `CompletionService`, hosted by Ray Serve.

    build_app(service, api_key)   the FastAPI app (tests drive it in-process with TestClient)
    CompletionDeployment          the thin Serve deployment: each replica starts the served backend's
                                  service once (its `Serving` declaration: spectune's engine loads the
                                  pair, vLLM starts a server), with that backend's deployment options
    app_builder(args)             for Serve config files (`serve run/deploy workers/serve/serve_config.yaml`)
    deploy(served, ...)           what `spectune serve` calls

Endpoints: POST /v1/completions (plain or SSE streaming), POST /v1/chat/completions (the same
through the model's chat template, `spectune.workers.serve.chat`), GET /v1/models, GET /healthz,
GET /config, GET /metrics (Prometheus, `spectune.workers.serve.metrics`; like /healthz it needs
no key, as vLLM's does not). Every bad request gets a 4xx whose body is OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, so client libraries show the reason: a body
over 1 MiB gets 413 before anything parses it, and a POST body not sent as `application/json`
gets 415 (a browser page may send `text/plain` across origins without asking first). A stream
that fails once started (its 200 is sent) ends with an error event and `[DONE]`, whatever the
exception. A client that drops a stream stops its decode after the current step; the only line
logged is Serve's own ("Client for request ... disconnected, cancelling request"), beside the
access line every request gets (`CancelledIsDisconnect`: Serve's cancellation is a disconnect).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from spectune.backends import BACKENDS, resolve
from spectune.workers.serve.chat import ChatCompletionRequest, chat_complete, chat_request, chat_stream
from spectune.workers.serve.openai_schema import CompletionRequest, ErrorBody, ErrorResponse, OpenAIFields
from spectune.workers.serve.served_config import Limits, ServeArgs, ServedConfig, choose
from spectune.workers.serve.service import CompletionService, Replica, RequestRejected

logger = logging.getLogger("spectune.serve")

APP_NAME = "spectune"
DEPLOYMENT_NAME = "SpectuneCompletions"
SSE_DONE = "data: [DONE]\n\n"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt the context holds
# its own fields first, then those every request shares (stop, and the ones taken at neutral values only)
_REQUEST_FIELDS = ", ".join(sorted(CompletionRequest.model_fields, key=lambda name: name in OpenAIFields.model_fields))


class AuthFailed(Exception):
    """No or a wrong bearer token while an API key is configured."""


class BodyTooLarge(Exception):
    """The request body passed `MAX_BODY_BYTES` while being read."""


class NotJson(Exception):
    """A POST body sent with another content type than application/json."""

    def __init__(self, content_type: str) -> None:
        super().__init__(content_type)
        self.content_type = content_type


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before anything parses it; at once when
    Content-Length says so, else as soon as the streamed (chunked) body passes the limit."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


class CancelledIsDisconnect:
    """ASGI middleware: when Serve cancels a request whose client went away, the app's `receive` raises
    Ray's TaskCancelledError; it is the client's disconnect (`http.disconnect`), not an error to log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def receive_or_disconnect() -> dict[str, Any]:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


def _too_large(limit: int) -> JSONResponse:
    return _error_response(413, "invalid_request_error",
                           f"the request body is over {limit // 1024} KiB; send a shorter prompt")


def build_app(service: CompletionService[Any], api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="spectune endpoint", summary=f"serving {service.model_id}", version="1")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(CancelledIsDisconnect)  # added last: the outermost, next to Serve's receive
    _add_error_handlers(app, service)
    authorized = Depends(_key_checker(api_key))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models", dependencies=[authorized])
    async def models() -> dict[str, Any]:
        return service.models().model_dump()

    @app.get("/config", dependencies=[authorized])
    async def config() -> dict[str, Any]:
        return service.config()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await service.prometheus(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", dependencies=[authorized], openapi_extra=_body_schema())
    async def completions(request: Request) -> Any:
        # The body is parsed here rather than by FastAPI so that the key is checked first
        # and every parse error gets the same one-line reason.
        body = CompletionRequest.model_validate_json(await _json_body(request))
        if not body.stream:
            return (await service.complete(body)).model_dump(mode="json")
        job = await service.admit(body)  # errors get their status before the stream starts
        return StreamingResponse(_sse(service.stream(body, job, request.is_disconnected)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=[authorized], openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Any:
        body = ChatCompletionRequest.model_validate_json(await _json_body(request))
        plain = chat_request(service, body)  # the conversation through the model's chat template
        if not body.stream:
            return (await chat_complete(service, plain)).model_dump(mode="json")
        job = await service.admit(plain)
        return StreamingResponse(_sse(chat_stream(service, plain, job, request.is_disconnected)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _json_body(request: Request) -> bytes:
    """The body, if it was sent as JSON (`NotJson` otherwise)."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise NotJson(content_type)
    return await request.body()


async def _sse(chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as err:  # noqa: BLE001 - the status line is already sent: whatever failed, report in-band
        logger.exception("stream failed")
        message = f"decoding failed: {type(err).__name__}: {' '.join(str(err).split())}"
        yield f"data: {_error('server_error', message).model_dump_json()}\n\n"
    yield SSE_DONE


def _key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise AuthFailed()

    return check


def _add_error_handlers(app: FastAPI, service: CompletionService[Any]) -> None:
    @app.exception_handler(ValidationError)
    async def invalid_body(_: Request, err: ValidationError) -> JSONResponse:
        service.metrics.rejected()
        param, message = _validation_reason(err.errors(include_url=False))
        return _error_response(400, "invalid_request_error", message, param)

    @app.exception_handler(RequestValidationError)
    async def invalid_params(_: Request, err: RequestValidationError) -> JSONResponse:
        param, message = _validation_reason(list(err.errors()))
        return _error_response(400, "invalid_request_error", message, param)

    @app.exception_handler(RequestRejected)
    async def rejected(_: Request, err: RequestRejected) -> JSONResponse:
        service.metrics.rejected()
        kind = "not_found_error" if err.status == 404 else "invalid_request_error"
        return _error_response(err.status, kind, str(err), err.param, err.code)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, __: BodyTooLarge) -> JSONResponse:
        return _too_large(MAX_BODY_BYTES)

    @app.exception_handler(NotJson)
    async def not_json(_: Request, err: NotJson) -> JSONResponse:
        service.metrics.rejected()
        got = f"got {err.content_type!r}" if err.content_type else "no Content-Type was sent"
        return _error_response(415, "invalid_request_error",
                               f"send the body as JSON with 'Content-Type: application/json' ({got})")

    @app.exception_handler(AuthFailed)
    async def unauthorized(_: Request, __: AuthFailed) -> JSONResponse:
        response = _error_response(401, "authentication_error",
                                   "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error_response(500, "server_error", f"internal error: {type(err).__name__}: {err}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code in (404, 405):
            message = (f"no endpoint {request.method} {request.url.path}; this server has POST /v1/completions, "
                       "POST /v1/chat/completions, GET /v1/models, GET /config, GET /healthz, GET /metrics")
        return _error_response(err.status_code, "invalid_request_error", message)


def _validation_reason(errors: list[Any]) -> tuple[str | None, str]:
    """(the first offending field, one line naming every problem)."""
    reasons, params = [], []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        params.append(field)
        reasons.append(_one_reason(error, field))
    return next((p for p in params if p), None), "; ".join(reasons)


def _one_reason(error: dict[str, Any], field: str | None) -> str:
    kind = error.get("type")
    if kind == "json_invalid":
        if error.get("input") in ("", b""):
            return "the request has no body: send a JSON object with a prompt"
        return f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}"
    if kind == "extra_forbidden":
        return f"unknown field {field!r} (this endpoint takes: {_REQUEST_FIELDS})"
    if kind == "missing":
        return f"{field} is required"
    if field is None:
        return f"the body must be a JSON object with a prompt ({error['msg']})"
    shown = error.get("input")
    got = f" (got {shown!r})" if isinstance(shown, (int, float, str, bool)) and len(repr(shown)) < 80 else ""
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}{got}"


def _error(kind: str, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))


def _error_response(status: int, kind: str, message: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(_error(kind, message, param, code).model_dump(), status_code=status)


def _body_schema(model: type[Any] = CompletionRequest) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# --- Ray Serve ----------------------------------------------------------------------------


# The options Serve takes per backend (max_ongoing_requests, max_constructor_retry_count) are its `Serving`'s: `bind`.
@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 1})
@serve.ingress()  # late-bound: the app needs the service this replica builds in __init__
class CompletionDeployment:
    """One replica: starts the served backend's completion service once and answers through `build_app`."""

    def __init__(self, served: dict[str, Any], limits: dict[str, Any], api_key: str | None = None) -> None:
        config = ServedConfig.model_validate(served)
        start = resolve(BACKENDS.get(config.backend).serving.service)
        self.service: CompletionService[Any] = start(config, Limits.model_validate(limits), Replica.assigned())
        self.api_key = api_key

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.service, self.api_key)

    def __del__(self) -> None:
        service = getattr(self, "service", None)  # absent when the service failed to start
        if service is not None:
            service.close()


def bind(served: ServedConfig, limits: Limits, api_key: str | None, *, replicas: int | None = None,
         autoscaling: dict[str, Any] | None = None, num_cpus: float | None = None,
         num_gpus: float | None = None, max_replicas_per_node: int | None = None) -> serve.Application:
    """The Serve application for `served`: its backend's deployment options, and these where given."""
    options: dict[str, Any] = BACKENDS.get(served.backend).serving.deployment_options()
    if max_replicas_per_node is not None:  # 1: every replica on its own node, so losing one node loses one replica
        options["max_replicas_per_node"] = max_replicas_per_node
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    elif replicas is not None:
        options["num_replicas"] = replicas
    actor_options = {key: value for key, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if value is not None}
    if actor_options:
        options["ray_actor_options"] = {"num_cpus": 1, **actor_options}
    return CompletionDeployment.options(**options).bind(served.model_dump(mode="json"), limits.model_dump(), api_key)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Serve config files: `import_path: spectune.workers.serve.app:app_builder` with `args:`
    as `ServeArgs` (config / trial / sweep+objective / nothing = the dashboard's mark, db,
    max_tokens_limit, decode_threads, api_key or $SPECTUNE_API_KEY). Replicas, autoscaling
    and resources come from the file's `deployments:` section."""
    parsed = ServeArgs.model_validate(args)
    return bind(choose(parsed), parsed.limits, parsed.resolved_api_key)


def deploy(app: serve.Application, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False) -> None:
    """Start Serve's HTTP proxy on host:port (127.0.0.1 unless told otherwise) and run `app` at /.

    One proxy, on the head node: the endpoint's address is the head's, replicas on any node answer
    through it, and nodes sharing one machine (`spectune cluster up`) do not fight over the port."""
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
