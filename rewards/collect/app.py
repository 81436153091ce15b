"""The annotation web app (FastAPI, served by uvicorn): plain HTML and a little JavaScript (static/), no build step.

Annotators open ``http://HOST:PORT/#token=TOKEN``; the page keeps the token in the tab and sends it as a bearer
token. Model text is untrusted: the page only ever sets it with ``textContent``, and the Content-Security-Policy lets
only the page's own script run. Every request body is counted as it arrives and refused past ``MAX_BODY_BYTES``,
before anything (authentication included) reads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .store import LabelRefused, LabelStore

MAX_BODY_BYTES = 16 * 1024
MAX_ITEM_ID = 2**63 - 1  # SQLite's largest integer
STATIC = Path(__file__).parent / "static"
PAGES = {"/": "annotate.html", "/admin": "admin.html"}
ASSETS = {"annotate.js", "admin.js", "style.css"}  # the only files served: no path from a request reaches the disk
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]


def valid_text(value: str | None) -> str | None:
    if value is not None:
        value.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) is not text: UnicodeEncodeError, a ValueError
    return value


class LabelIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # "7", 8.0 and true are not item ids

    item_id: int = Field(ge=1, le=MAX_ITEM_ID)
    choice: Literal["A", "B", "tie", "skip"]
    note: str | None = Field(default=None, max_length=2000)
    seconds: float | None = Field(default=None, ge=0, le=86400, allow_inf_nan=False)

    _text = field_validator("note")(valid_text)


class Guard:
    """Pure ASGI, outermost: count the body's bytes as they arrive (a lying Content-Length or a chunked body changes
    nothing) and answer 413 at the first byte over the limit; add the security headers to every answer."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if scope["path"].startswith("/api/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send_with_headers)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self.refuse(send_with_headers)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def refuse(self, send) -> None:
        data = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


def create_app(store: LabelStore, labels_per_item: int = 1, lease_seconds: float = 600.0):
    app = FastAPI(title="tristage collect", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        """422 naming the field and the rule, without echoing the input back (it may not even be encodable)."""
        detail = [{"field": ".".join(str(p) for p in e["loc"][1:]), "error": e["msg"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    def annotator(authorization: str | None = Header(default=None)):
        scheme, _, token = (authorization or "").partition(" ")
        row = store.annotator(token.strip()) if scheme.lower() == "bearer" else None
        if row is None:
            raise HTTPException(status_code=401, detail="a valid annotator token is required")
        return row

    def admin(row=Depends(annotator)):
        if not row["is_admin"]:
            raise HTTPException(status_code=403, detail="an admin token is required")
        return row

    for path, page in PAGES.items():
        app.get(path)(lambda page=page: FileResponse(STATIC / page, media_type="text/html"))

    @app.get("/static/{name}")
    def asset(name: str):
        if name not in ASSETS:
            raise HTTPException(status_code=404)
        return FileResponse(STATIC / name)

    @app.get("/api/next")
    def next_item(row=Depends(annotator)):
        return {"item": store.next_item(row["id"], labels_per_item, lease_seconds), "annotator": row["name"],
                "progress": store.progress(row["id"], labels_per_item), "lease_seconds": lease_seconds}

    @app.get("/api/answered/{item_id}")
    def answered(item_id: int = PathParameter(ge=1, le=MAX_ITEM_ID), row=Depends(annotator)):
        item = store.answered_item(item_id, row["id"])
        if item is None:
            raise HTTPException(status_code=404, detail=f"you have not answered item {item_id}")
        return item

    @app.post("/api/label")
    def label(body: LabelIn, row=Depends(annotator)):
        try:
            result = store.add_label(body.item_id, row["id"], body.choice, body.note, body.seconds, labels_per_item,
                                     admin=bool(row["is_admin"]))
        except KeyError:
            raise HTTPException(status_code=404, detail="no such item") from None
        except LabelRefused as err:
            raise HTTPException(status_code=409, detail=str(err)) from None
        return {"saved": True, **result}  # sent only after the label is committed

    @app.get("/api/admin/stats")
    def stats(_row=Depends(admin)):
        from .report import collection_stats

        return collection_stats(store, labels_per_item)

    @app.get("/api/admin/export", response_class=PlainTextResponse)
    def export(ties: Literal["drop", "tie"] = "drop", min_answers: int = Query(default=1, ge=1, le=1000), _row=Depends(admin)):
        import tempfile

        from .report import export_store

        with tempfile.TemporaryDirectory() as tmp:  # our own temporary file, never a path from the request
            path = Path(tmp) / "prefs.jsonl"
            export_store(store, path, ties=ties, min_answers=min_answers)
            return path.read_text(encoding="utf-8")

    return Guard(app)
