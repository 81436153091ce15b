"""The annotation web app (FastAPI, served by uvicorn): plain HTML and a little JavaScript, no build step.

Annotators open ``http://HOST:PORT/#token=TOKEN``; the page keeps the token in the tab and sends it as a
bearer token. Model text is untrusted: the page only ever sets it with ``textContent``, never as HTML.
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from .store import CHOICES, LabelStore

MAX_BODY_BYTES = 16 * 1024


class LabelIn(BaseModel):
    item_id: int
    choice: str = Field(pattern="^(A|B|tie|skip)$")
    note: str | None = Field(default=None, max_length=2000)
    seconds: float | None = Field(default=None, ge=0, le=86400)


def create_app(store: LabelStore, labels_per_item: int = 1) -> FastAPI:
    app = FastAPI(title="tristage collect", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "Content-Length required"}, status_code=411)
            if int(length) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    def annotator(authorization: str | None = Header(default=None)):
        token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        row = store.annotator(token)
        if row is None:
            raise HTTPException(status_code=401, detail="a valid annotator token is required")
        return row

    def admin(row=Depends(annotator)):
        if not row["is_admin"]:
            raise HTTPException(status_code=403, detail="an admin token is required")
        return row

    @app.get("/", response_class=HTMLResponse)
    def annotate_page():
        return ANNOTATE_HTML

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page():
        return ADMIN_HTML

    @app.get("/api/next")
    def next_item(row=Depends(annotator)):
        return {"item": store.next_item(row["id"], labels_per_item), "progress": store.progress(row["id"], labels_per_item),
                "annotator": row["name"]}

    @app.post("/api/label")
    def label(body: LabelIn, row=Depends(annotator)):
        try:
            stored = store.add_label(body.item_id, row["id"], body.choice, body.note, body.seconds)
        except KeyError:
            raise HTTPException(status_code=404, detail="no such item") from None
        return {"saved": True, "duplicate": not stored}  # sent only after the label is committed

    @app.get("/api/admin/stats")
    def stats(_row=Depends(admin)):
        from .report import collection_stats

        return collection_stats(store, labels_per_item)

    @app.get("/api/admin/export", response_class=PlainTextResponse)
    def export(ties: str = "drop", min_answers: int = 1, _row=Depends(admin)):
        import tempfile
        from pathlib import Path

        from .report import export_store

        if ties not in ("drop", "margin0"):
            raise HTTPException(status_code=400, detail="ties must be drop or margin0")
        with tempfile.TemporaryDirectory() as tmp:  # our own temporary file, never a path from the request
            path = Path(tmp) / "prefs.jsonl"
            export_store(store, path, ties=ties, min_answers=min_answers)
            return path.read_text(encoding="utf-8")

    return app


ANNOTATE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tristage: which response is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
 .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.95rem; border: 1px solid #ccc;
         border-radius: 6px; padding: 0.8rem; background: #fafafa; }
 #pair { display: flex; gap: 1rem; } #pair > div { flex: 1; }
 button { font-size: 1rem; margin: 0.4rem 0.3rem 0 0; padding: 0.4rem 0.9rem; }
 #status { color: #555; margin-top: 0.6rem; } kbd { border: 1px solid #999; border-radius: 3px; padding: 0 4px; }
</style></head><body>
<h2>Which response is better?</h2>
<div id="progress"></div>
<h3>Prompt</h3><div id="prompt" class="text"></div>
<div id="pair"><div><h3>A</h3><div id="a" class="text"></div></div><div><h3>B</h3><div id="b" class="text"></div></div></div>
<div><textarea id="note" rows="2" cols="60" placeholder="optional note"></textarea></div>
<div>
 <button id="choose-A" data-choice="A">A is better <kbd>1</kbd></button>
 <button id="choose-B" data-choice="B">B is better <kbd>2</kbd></button>
 <button id="choose-tie" data-choice="tie">Tie <kbd>3</kbd></button>
 <button id="choose-skip" data-choice="skip">Skip <kbd>s</kbd></button>
 <button id="submit">Submit <kbd>Enter</kbd></button>
</div>
<div id="status"></div>
<script>
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) { sessionStorage.setItem("token", params.get("token")); history.replaceState(null, "", location.pathname); }
const token = sessionStorage.getItem("token");
let item = null, choice = null, shownAt = 0, busy = false;
const $ = (id) => document.getElementById(id);
function show(text) { $("status").textContent = text; }
function render(messages) {
  return messages.map((m) => (messages.length > 1 ? m.role + ": " : "") + m.content).join("\\n\\n");
}
async function api(path, options = {}) {
  options.headers = Object.assign({"Authorization": "Bearer " + token, "Content-Type": "application/json"}, options.headers || {});
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(response.status + " " + (await response.text()));
  return response.json();
}
async function load() {
  const data = await api("/api/next");
  const p = data.progress;
  $("progress").textContent = data.annotator + ": " + p.mine + " labeled; " + p.complete + " of " + p.items + " items complete";
  item = data.item; choice = null; $("note").value = "";
  if (!item) { $("prompt").textContent = "Nothing left to label. Thank you!"; $("a").textContent = ""; $("b").textContent = ""; return; }
  $("prompt").textContent = render(item.prompt);
  $("a").textContent = item.response_a;
  $("b").textContent = item.response_b;
  shownAt = Date.now();
}
function pick(c) { if (!item) return; choice = c; show("selected: " + c + " (Enter or Submit to save)"); }
async function submit() {
  if (!item || !choice || busy) return;
  busy = true;
  try {
    await api("/api/label", {method: "POST", body: JSON.stringify({item_id: item.id, choice: choice,
      note: $("note").value || null, seconds: (Date.now() - shownAt) / 1000})});
    show("saved: item " + item.id + " = " + choice);
    await load();
  } catch (e) { show("NOT saved: " + e.message); } finally { busy = false; }
}
document.querySelectorAll("button[data-choice]").forEach((b) => b.addEventListener("click", () => { pick(b.dataset.choice); submit(); }));
$("submit").addEventListener("click", submit);
document.addEventListener("keydown", (e) => {
  if (e.target === $("note")) { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } return; }
  const keys = {"1": "A", "2": "B", "3": "tie", "s": "skip"};
  if (keys[e.key]) pick(keys[e.key]);
  else if (e.key === "Enter") submit();
});
if (!token) show("Open this page with the link you were given (it ends in #token=...)."); else load().catch((e) => show(e.message));
</script></body></html>
"""

ADMIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tristage collect: admin</title>
<style> body { font-family: system-ui, sans-serif; margin: 1.5rem; } pre { background: #fafafa; padding: 1rem; } </style>
</head><body><h2>Collection status</h2><pre id="stats">loading...</pre>
<p>Export: <code>GET /api/admin/export?ties=drop|margin0</code>, or <code>tristage collect export</code>.</p>
<script>
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) { sessionStorage.setItem("admin", params.get("token")); history.replaceState(null, "", location.pathname); }
fetch("/api/admin/stats", {headers: {"Authorization": "Bearer " + sessionStorage.getItem("admin")}})
  .then((r) => r.ok ? r.json() : Promise.reject(r.status))
  .then((s) => { document.getElementById("stats").textContent = JSON.stringify(s, null, 2); })
  .catch((e) => { document.getElementById("stats").textContent = "refused: " + e; });
</script></body></html>
"""
