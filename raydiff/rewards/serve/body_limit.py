"""Request body size limit for the ingress (413 before the body is parsed)."""

from fastapi.responses import JSONResponse

class BodyLimit:
    """ASGI middleware: 413 once a request body passes the limit (Content-Length or streamed).

    The FastAPI app is module level (Serve needs it when the class is decorated), so the limit
    is a process global that RewardIngress.__init__ sets from the service config (one ingress
    per replica process).
    """

    max_bytes = 64 * 2**20

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > BodyLimit.max_bytes:
            return await self._reject(send, int(length))
        seen, rejected = 0, False

        async def limited_receive():
            # Past the limit: answer 413 ourselves and tell the app the client left. (Raising here
            # would be turned into a 400 by FastAPI's body parsing.)
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > BodyLimit.max_bytes:
                    rejected = True
                    await self._reject(send, seen)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not rejected:  # drop whatever the app answers after our 413
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send, size: int):
        resp = JSONResponse({"detail": f"request body is {size}+ bytes, over max_body_bytes={BodyLimit.max_bytes}"},
                            status_code=413)
        await resp({"type": "http"}, None, send)

