const params = new URLSearchParams(location.hash.slice(1));
if (params.get("token")) { sessionStorage.setItem("admin", params.get("token")); history.replaceState(null, "", location.pathname); }
fetch("/api/admin/stats", {headers: {"Authorization": "Bearer " + sessionStorage.getItem("admin")}})
  .then((r) => r.ok ? r.json() : Promise.reject(r.status))
  .then((s) => { document.getElementById("stats").textContent = JSON.stringify(s, null, 2); })
  .catch((e) => { document.getElementById("stats").textContent = "refused: " + e; });
