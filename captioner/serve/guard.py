"""Body checks in the HTTP process, before a request is queued for the model.

LitServe parses the body of ``POST /caption`` itself (JSON or a multipart form) and answers
anything it cannot parse with a 500; this ASGI middleware makes those 4xx with one line, and
bounds memory: a body over ``max_body_bytes`` is refused from its ``Content-Length`` or as soon
as the bytes read pass the limit, never held whole (the rest is read and dropped, so the client
gets the answer). A checked body is replayed to LitServe."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse

FORMATS = "send multipart/form-data with an 'image' file field, or JSON {\"image\": \"<base64>\"}"


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class RequestGuard:
    def __init__(self, app, path: str = "/caption", max_body_bytes: int = 20 << 20,
                 max_form_fields: int = 16, linger_s: float = 10.0):
        self.app, self.path, self.max_body = app, path, max_body_bytes
        self.max_form_fields, self.linger_s = max_form_fields, linger_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._checked_body(scope, receive)
        except _Refused as e:
            # the client may still be sending: Connection: close tells it the rest is not read
            response = JSONResponse({"detail": e.detail}, status_code=e.status,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        return await self.app(scope, replay, send)

    async def _checked_body(self, scope, receive) -> bytes:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise _Refused(415, f"Content-Type {kind or 'missing'!r} not accepted: {FORMATS}")
        length = headers.get("content-length")
        limit = f"over the limit of {self.max_body} bytes (--max-body-mb)"
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._discard(receive)
            raise _Refused(413, f"body of {int(length)} bytes is {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                chunks.clear()
                if message.get("more_body", False):
                    await self._discard(receive)
                raise _Refused(413, f"body is {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body:
            raise _Refused(400, f"empty body: {FORMATS}")
        if kind == "application/json":
            try:
                value = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise _Refused(400, f"body is not valid JSON ({str(e).splitlines()[0][:120]})") from None
            if not isinstance(value, dict):
                raise _Refused(400, f"JSON body must be an object: {FORMATS}")
        else:
            await self._check_form(scope, body)
        return body

    async def _discard(self, receive) -> None:
        """Read the rest of a refused body without keeping it, for at most ``linger_s``: a
        client sends its whole body before it reads the answer, and closing the connection on
        unread bytes resets it, losing the answer (nginx's lingering close does the same)."""

        async def drain():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(drain(), self.linger_s)
        except asyncio.TimeoutError:
            pass  # a client still sending: the answer goes out and the connection closes

    async def _check_form(self, scope, body: bytes) -> None:
        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form(max_files=1, max_fields=self.max_form_fields)
        except Exception as e:  # starlette's HTTPException / MultiPartException: bad framing
            detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
            raise _Refused(400, f"malformed multipart body ({str(detail).splitlines()[0][:120]})") from None
        await form.close()
