// The annotation page. Model text is untrusted: it is only ever set with textContent, never as HTML.
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) { sessionStorage.setItem("token", params.get("token")); history.replaceState(null, "", location.pathname); }
const token = sessionStorage.getItem("token");
let item = null, choice = null, shownAt = 0, busy = false, lastId = null;
const $ = (id) => document.getElementById(id);
function show(text) { $("status").textContent = text; }
function render(messages) {
  return messages.map((m) => (messages.length > 1 ? m.role + ": " : "") + m.content).join("\n\n");
}
async function api(path, options = {}) {
  options.headers = Object.assign({"Authorization": "Bearer " + token, "Content-Type": "application/json"}, options.headers || {});
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = await response.text();
    try { detail = JSON.parse(detail).detail; } catch (e) { /* plain text */ }
    throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return response.json();
}
function display(next) {
  item = next; choice = null; $("note").value = (next && next.note) || "";
  if (!item) { $("prompt").textContent = "Nothing left to label. Thank you!"; $("a").textContent = ""; $("b").textContent = ""; return; }
  $("prompt").textContent = render(item.prompt);
  $("a").textContent = item.response_a;
  $("b").textContent = item.response_b;
  shownAt = Date.now();
}
async function load() {
  const data = await api("/api/next");
  const p = data.progress;
  $("progress").textContent = data.annotator + ": " + p.mine + " labeled; " + p.complete + " of " + p.items + " items complete";
  display(data.item);
}
function pick(c) { if (!item) return; choice = c; show("selected: " + c + " (Enter or Submit to save)"); }
async function submit() {
  if (!item || !choice || busy) return;
  busy = true;
  try {
    const saved = await api("/api/label", {method: "POST", body: JSON.stringify({item_id: item.id, choice: choice,
      note: $("note").value || null, seconds: (Date.now() - shownAt) / 1000})});
    show(saved.changed ? "changed: item " + item.id + " = " + choice + " (was " + saved.previous + ")"
                       : "saved: item " + item.id + " = " + choice);
    lastId = item.id; $("change-last").disabled = false;
    await load();
  } catch (e) { show("NOT saved: " + e.message); } finally { busy = false; }
}
async function changeLast() {
  if (lastId === null) return;
  try {
    const previous = await api("/api/answered/" + lastId);
    display(previous);
    show("your answer to item " + previous.id + " is " + previous.choice + ": choose again to change it");
  } catch (e) { show(e.message); }
}
document.querySelectorAll("button[data-choice]").forEach((b) => b.addEventListener("click", () => { pick(b.dataset.choice); submit(); }));
$("submit").addEventListener("click", submit);
$("change-last").addEventListener("click", changeLast);
document.addEventListener("keydown", (e) => {
  if (e.target === $("note")) { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } return; }
  const keys = {"1": "A", "2": "B", "3": "tie", "s": "skip"};
  if (keys[e.key]) pick(keys[e.key]);
  else if (e.key === "Enter") submit();
});
if (!token) show("Open this page with the link you were given (it ends in #token=...)."); else load().catch((e) => show(e.message));
