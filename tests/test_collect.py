"""Human preference collection: the store, the API, agreement, export into stage 2, a load test with a
SIGKILL, and a real browser (headless Chromium) labeling with mouse and keyboard."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import FIXTURES, ROOT, assert_ok, run_stage
from rewards.collect.agreement import cohen_kappa, fleiss_kappa, majority, percent_agreement
from rewards.collect.store import LabelStore

HOSTILE = 'Sure! <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & done\nline two'


def make_items(n: int, hostile: bool = False) -> list[dict]:
    return [{"key": f"item-{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "response_a": HOSTILE if hostile and i == 0 else f"Answer A to {i}. Thanks!", "response_b": f"B{i}",
             "source_a": "m1", "source_b": "m2"} for i in range(n)]


def test_agreement_statistics_match_textbook_values():
    # Cohen's kappa: 20 items, observed 0.7, expected 0.5 -> 0.4
    first = ["A"] * 10 + ["B"] * 10
    second = ["A"] * 7 + ["B"] * 3 + ["A"] * 3 + ["B"] * 7
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    # Fleiss' kappa: perfect agreement is 1; the Wikipedia-style check with a computed reference
    assert fleiss_kappa({1: ["A", "A", "A"], 2: ["B", "B", "B"], 3: ["tie", "tie", "tie"]}) == pytest.approx(1.0)
    labels = {1: ["A", "A", "B"], 2: ["B", "B", "B"], 3: ["A", "tie", "B"], 4: ["A", "A", "A"]}
    n, rows = 3, [dict((c, v.count(c)) for c in ("A", "B", "tie")) for v in labels.values()]
    p_i = [(sum(x * x for x in r.values()) - n) / (n * (n - 1)) for r in rows]
    p_j = [sum(r[c] for r in rows) / (len(rows) * n) for c in ("A", "B", "tie")]
    expected = (sum(p_i) / len(p_i) - sum(p * p for p in p_j)) / (1 - sum(p * p for p in p_j))
    assert fleiss_kappa(labels) == pytest.approx(expected)
    assert percent_agreement({1: ["A", "A", "B"]}) == pytest.approx(1 / 3)
    assert majority(["A", "B"]) is None and majority(["A", "A", "B"]) == "A"


@pytest.fixture()
def client(tmp_path):
    from fastapi.testclient import TestClient

    from rewards.collect.app import create_app

    store = LabelStore(tmp_path / "labels.db")
    store.add_items(make_items(3))
    tokens = {name: store.create_annotator(name) for name in ("alice", "bob", "carol")}
    tokens["admin"] = store.create_annotator("admin", admin=True)
    return TestClient(create_app(store, labels_per_item=2)), tokens, store


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_queue_and_k_answers_per_item(client):
    http, tokens, store = client
    assert http.get("/api/next").status_code == 401
    assert http.get("/api/next", headers=auth("forged")).status_code == 401
    assert http.post("/api/label", json={"item_id": 1, "choice": "A"}).status_code == 401
    assert http.get("/api/admin/stats", headers=auth(tokens["alice"])).status_code == 403

    seen = []
    while (item := http.get("/api/next", headers=auth(tokens["alice"])).json()["item"]) is not None:
        seen.append(item["id"])
        assert http.post("/api/label", headers=auth(tokens["alice"]), json={"item_id": item["id"], "choice": "A"}).json() == \
            {"saved": True, "duplicate": False}
    assert sorted(seen) == [1, 2, 3]  # every item once, never twice
    again = http.post("/api/label", headers=auth(tokens["alice"]), json={"item_id": 1, "choice": "B"}).json()
    assert again["duplicate"] is True and len(store.labels()) == 3

    for item_id, choice in [(1, "skip"), (2, "B"), (3, "tie")]:  # bob: a skip does not count as an answer
        http.post("/api/label", headers=auth(tokens["bob"]), json={"item_id": item_id, "choice": choice})
    # carol may only get item 1: items 2 and 3 have their k=2 answers and left the queue
    assert http.get("/api/next", headers=auth(tokens["carol"])).json()["item"]["id"] == 1
    stats = http.get("/api/admin/stats", headers=auth(tokens["admin"])).json()
    assert stats["items_complete"] == 2 and stats["annotators"]["bob"]["skips"] == 1
    assert stats["agreement"]["items_with_several_answers"] == 2 and stats["agreement"]["percent"] == 0.0

    assert http.post("/api/label", headers=auth(tokens["carol"]), json={"item_id": 1, "choice": "maybe"}).status_code == 422
    assert http.post("/api/label", headers=auth(tokens["carol"]), json={"item_id": 99, "choice": "A"}).status_code == 404
    big = http.post("/api/label", headers={**auth(tokens["carol"]), "Content-Type": "application/json"}, content=b" " * 20_000)
    assert big.status_code == 413


def test_export_trains_the_reward_model_stage(tmp_path, tiny_model):
    from rewards.collect.report import export_store

    store = LabelStore(tmp_path / "labels.db")
    topics = ["tea", "the lamp", "a kettle", "my order", "shipping", "a refund", "the color", "a pillow"]
    store.add_items([{"key": t, "prompt": [{"role": "user", "content": f"Tell me about {t}."}], "response_a": "No.",
                      "response_b": f"Sure, {t} is nice. Thanks!"} for t in topics])
    people = [store.create_annotator(n) for n in ("a", "b", "c")]
    rows = {row["name"]: row["id"] for row in store._connect().execute("SELECT * FROM annotators")}
    for item_id in range(1, 9):
        for name, choice in zip(("a", "b", "c"), ("B", "B", "A")):
            store.add_label(item_id, rows[name], choice)
    out = tmp_path / "prefs.jsonl"
    counts = export_store(store, out, min_answers=2)
    assert counts["pairs"] == 8
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["chosen"].startswith("Sure") and r["rejected"] == "No." for r in records)
    assert_ok(run_stage("rm", f"model_name_or_path={tiny_model}", f"dataset={out}", f"output_dir={tmp_path / 'rm'}",
                        config=FIXTURES / "rm_tiny.yaml"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db, port, labels_per_item=1):
    process = subprocess.Popen([sys.executable, "-m", "stages.cli", "collect", "serve", "--db", str(db), "--port", str(port),
                                "--labels-per-item", str(labels_per_item)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return process
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("collect server did not start")


def post_label(port, token, item_id, choice="A") -> dict:
    body = json.dumps({"item_id": item_id, "choice": choice}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/label", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_load_20_annotators_x_100_labels_and_a_sigkill(tmp_path):
    db = tmp_path / "labels.db"
    store = LabelStore(db)
    store.add_items(make_items(100))
    tokens = [store.create_annotator(f"annotator{i}") for i in range(20)]
    ids = {row["name"]: row["id"] for row in store._connect().execute("SELECT * FROM annotators")}
    port = free_port()
    server = start_server(db, port, labels_per_item=20)
    errors = []

    def annotate(token):
        try:
            for item_id in range(1, 101):
                assert post_label(port, token, item_id)["saved"]
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=annotate, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.killpg(server.pid, signal.SIGTERM)
    server.wait()
    assert not errors
    rows = store._connect().execute("SELECT item_id, annotator_id FROM labels").fetchall()
    assert len(rows) == 2000 and len({(r[0], r[1]) for r in rows}) == 2000

    # Now a SIGKILL in the middle of a load: every acknowledged label must be there after a restart.
    store.add_items([{**item, "key": "second-" + item["key"]} for item in make_items(100)])
    server = start_server(db, port, labels_per_item=20)
    acknowledged, lock = [], threading.Lock()

    def annotate_until_refused(token):
        for item_id in range(101, 201):
            try:
                if post_label(port, token, item_id)["saved"]:
                    with lock:
                        acknowledged.append((item_id, token))
            except Exception:  # noqa: BLE001 - the server is being killed
                return

    threads = [threading.Thread(target=annotate_until_refused, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    while len(acknowledged) < 300:
        time.sleep(0.01)
    os.killpg(server.pid, signal.SIGKILL)
    for t in threads:
        t.join()
    server.wait()
    stored = {(r[0], r[1]) for r in LabelStore(db)._connect().execute("SELECT item_id, annotator_id FROM labels WHERE item_id > 100")}
    token_ids = {t: ids[f"annotator{i}"] for i, t in enumerate(tokens)}
    assert 300 <= len(acknowledged) < 2000
    assert all((item_id, token_ids[token]) in stored for item_id, token in acknowledged)
    restarted = start_server(db, port, labels_per_item=20)  # and the server comes back on the same database
    try:
        assert post_label(port, tokens[0], 200, "B")["saved"]
    finally:
        os.killpg(restarted.pid, signal.SIGTERM)
        restarted.wait()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_a_browser_labels_with_mouse_and_keyboard_and_model_text_stays_text(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "labels.db"
    store = LabelStore(db)
    store.add_items(make_items(3, hostile=True))
    token = store.create_annotator("alice")
    alice = store._connect().execute("SELECT id FROM annotators WHERE name='alice'").fetchone()[0]
    port = free_port()
    server = start_server(db, port)
    try:
        browser.get(f"http://127.0.0.1:{port}/#token={token}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "a").text.startswith("Sure!"))
        # the hostile response is shown as text and ran nothing
        assert "<script>" in browser.find_element(By.ID, "a").text and "onerror" in browser.find_element(By.ID, "a").text
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements(By.CSS_SELECTOR, "#a img, #a script")

        browser.find_element(By.ID, "choose-B").click()  # mouse
        wait.until(lambda d: "saved: item 1" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: d.find_element(By.ID, "prompt").text == "Question 1?")
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("3")  # keyboard: tie, then Enter
        body.send_keys(Keys.ENTER)
        wait.until(lambda d: "saved: item 2" in d.find_element(By.ID, "status").text)
        note = browser.find_element(By.ID, "note")
        note.send_keys("both fine")
        body.send_keys("s")
        note.send_keys(Keys.ENTER)
        wait.until(lambda d: "Nothing left" in d.find_element(By.ID, "prompt").text)
        assert browser.execute_script("return window.pwned === undefined")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    rows = LabelStore(db)._connect().execute("SELECT item_id, choice, note FROM labels WHERE annotator_id = ? ORDER BY item_id",
                                             (alice,)).fetchall()
    assert [tuple(r) for r in rows] == [(1, "B", None), (2, "tie", None), (3, "skip", "both fine")]


def test_items_sampled_from_two_models_and_from_eval_pairs(tmp_path, tiny_model, keyword_policy):
    from rewards.collect.cli import main

    db = tmp_path / "labels.db"
    prompts = FIXTURES / "alpaca_en_demo_sample.json"
    assert main(["add", "--db", str(db), "--models", str(tiny_model), str(keyword_policy), "--prompts", str(prompts),
                 "--max-new-tokens", "8"]) == 0
    items = LabelStore(db).items()
    assert len(items) == 8
    assert {(i["source_a"], i["source_b"]) for i in items} == {(str(tiny_model), str(keyword_policy)),
                                                               (str(keyword_policy), str(tiny_model))}  # order randomized
    assert main(["add", "--db", str(db), "--models", str(tiny_model), str(keyword_policy), "--prompts", str(prompts),
                 "--max-new-tokens", "8"]) == 0
    assert len(LabelStore(db).items()) == 8  # the same items are not added twice

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "x", "prompt": "Hi?", "response_a": "a", "response_b": "b", "source_a": "m", "source_b": "n"})
                     + "\n" + json.dumps({"prompt": [{"role": "user", "content": "Yo?"}], "responses": ["c", "d"]}) + "\n")
    assert main(["add", "--db", str(db), "--pairs", str(pairs)]) == 0
    assert len(LabelStore(db).items()) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "response_a": "a"}) + "\n")
    from stages.common.errors import DataError

    with pytest.raises(DataError, match="record 1.*response_b"):
        main(["add", "--db", str(db), "--pairs", str(bad)])
