"""What one HTTP client may hold: a body over the cap is a 413 in the OpenAI error shape before
it is read, and a client that stops reading its response is dropped after a while.

Starlette's own limiter (FastAPI's `max_body_size`) answers a declared oversize body in plain
text, whatever the app's handlers say; this one answers JSON on both paths."""

import asyncio
import logging

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.gateway.openai_types import error_response

log = logging.getLogger("baton.gateway")

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


class WriteTimeout:
    """ASGI middleware: a client that takes nothing of its response (its TCP window shut) holds
    a write at most `timeout_s`; then the response ends, and with it the request: the stream's
    cleanup aborts it on the services and frees its admission slot. Without this, 256 clients
    that never read hold every slot for good (uvicorn's writes wait without a deadline)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stalled = False

        async def timed(message: Message) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except TimeoutError:
                stalled = True
                raise

        try:
            await self.app(scope, receive, timed)
        except Exception:
            if not stalled:
                raise
            # Starlette turns the timeout into a ClientDisconnect: either way, the client is gone
            log.warning("dropped a client that read nothing for %.0f s", self.timeout_s)
