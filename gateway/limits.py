"""The request body cap: 413 in the OpenAI error shape, before a large body is read.

Starlette's own limiter (FastAPI's `max_body_size`) answers a declared oversize body in plain
text, whatever the app's handlers say; this one answers JSON on both paths."""

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.gateway.openai_types import error_response

# far above what any context admits (a 128k-token prompt is ~1 MB of JSON)
MAX_BODY_BYTES = 8 << 20


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused by its Content-Length, or, when it
    declares none, as soon as the bytes read pass the cap (HTTPException, which the app's
    handler shapes)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over {self.max_bytes} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = error_response(message, "invalid_request_error", 413).model_dump()
            response = JSONResponse(body, 413)
            return await response(scope, receive, send)
        num_bytes = 0

        async def counted() -> Message:
            nonlocal num_bytes
            msg = await receive()
            num_bytes += len(msg.get("body", b""))
            if num_bytes > self.max_bytes:
                raise HTTPException(413, message)
            return msg

        await self.app(scope, counted, send)
