"""The collection server as users run it (``tristage collect serve`` under uvicorn): the body limit on the wire, a load
test of 20 annotators with a SIGKILL in the middle, and a real browser (headless Chromium) under the page's CSP."""
from __future__ import annotations

import json
import os
import random
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

from conftest import ROOT, free_port
from rewards.collect.store import LabelStore
from test_collect import make_items


def start_server(db, port, labels_per_item=1, lease_seconds=600):
    process = subprocess.Popen([sys.executable, "-m", "stages.cli", "collect", "serve", "--db", str(db), "--port", str(port),
                                "--labels-per-item", str(labels_per_item), "--lease-seconds", str(lease_seconds)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return process
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("collect server did not start")


def stop(process, sig=signal.SIGTERM):
    os.killpg(process.pid, sig)
    process.wait()


def call(port, token, path, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def raw_request(port, head: bytes, chunks, read_timeout=30.0) -> bytes:
    """Send a request by hand (what a hostile client does) and return what the server answered, if anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before we finished: what we want
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except (ConnectionResetError, socket.timeout):
            pass
        return answer


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_the_body_limit_counts_bytes_received_not_the_header(tmp_path):
    db = tmp_path / "labels.db"
    store = LabelStore(db, create=True)
    store.add_items(make_items(2))
    token = store.create_annotator("alice")
    port = free_port()
    server = start_server(db, port)
    try:
        assert call(port, token, "/api/next")["item"]["id"] == 1
        # a chunked body of 1 MB under a Content-Length of 30 (the header lies; the bytes are counted)
        note = "x" * (1 << 20)
        body = json.dumps({"item_id": 1, "choice": "A", "note": note}).encode()
        chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192]) for i in range(0, len(body), 8192)] + [b"0\r\n\r\n"]
        head = (f"POST /api/label HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        answer = raw_request(port, head, chunks)
        assert answer.split(b"\r\n")[0].split()[1] in (b"400", b"413"), answer[:200]  # refused (h11 refuses both headers: 400)
        # the same without the lying header: chunked only, so nothing but counting can stop it
        head = head.replace(b"Content-Length: 30\r\n", b"")
        assert raw_request(port, head, chunks).split(b"\r\n")[0].split()[1] == b"413"
        assert LabelStore(db).labels() == []  # nothing stored

        # an unauthenticated 50 MB body is refused at the limit, not read whole before the 401
        before = rss_kib(server.pid)
        head = b"POST /api/label HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        started = time.monotonic()
        answer = raw_request(port, head, (chunk for _ in range(50)))
        assert answer.split(b"\r\n")[0].split()[1] == b"413" and b"nosniff" in answer.lower()
        assert rss_kib(server.pid) - before < 20 * 1024  # the server did not hold the 50 MB (round 1: +200 MB)
        assert time.monotonic() - started < 60
        assert call(port, token, "/api/next")["item"]["id"] == 1  # and it still serves
    finally:
        stop(server)


@pytest.mark.slow
def test_load_20_annotators_x_100_labels_double_submissions_and_a_sigkill(tmp_path):
    """20 annotators, k=2, 1,000 items: each asks, waits a little, answers (sometimes twice, sometimes changing their
    mind, sometimes skipping), 100 times. Then 500 more items, a SIGKILL mid-load, a restart, and everyone finishes."""
    db = tmp_path / "labels.db"
    store = LabelStore(db, create=True)
    store.add_items(make_items(1000))
    tokens = [store.create_annotator(f"annotator{i}") for i in range(20)]
    ids = {t: store.annotator(t)["id"] for t in tokens}
    port = free_port()
    server = start_server(db, port, labels_per_item=2)
    acknowledged: dict[tuple[int, str], list[str]] = {}  # (item, token) -> choices acknowledged, in order
    attempted: dict[tuple[int, str], list[str]] = {}
    errors, lock = [], threading.Lock()

    def annotate(token, seed, labels=None):
        rng = random.Random(seed)
        done = 0
        while labels is None or done < labels:
            item = call(port, token, "/api/next")["item"]
            if item is None:
                return
            time.sleep(rng.random() * 0.01)
            choices = [rng.choice(["A", "B", "tie"]) if rng.random() > 0.05 else "skip"]
            if choices[0] != "skip" and rng.random() < 0.15:  # a double submission: the same answer twice, or a changed mind
                choices.append(choices[0] if rng.random() < 0.5 else rng.choice(["A", "B", "tie"]))
            for choice in choices:
                with lock:
                    attempted.setdefault((item["id"], token), []).append(choice)
                saved = call(port, token, "/api/label", {"item_id": item["id"], "choice": choice, "seconds": 1.5})
                assert saved["saved"] and saved["changed"] == (len(attempted[item["id"], token]) > 1 and choice != choices[0])
                with lock:
                    acknowledged.setdefault((item["id"], token), []).append(choice)
            done += 1

    def run_all(labels=None, keep_errors=True):
        def guarded(token, seed):
            try:
                annotate(token, seed, labels)
            except Exception as err:  # noqa: BLE001 - asserted by the caller
                if keep_errors:
                    errors.append(err)
        threads = [threading.Thread(target=guarded, args=(t, i)) for i, t in enumerate(tokens)]
        for t in threads:
            t.start()
        return threads

    for t in run_all(labels=100):
        t.join()
    assert not errors, errors[:3]
    stop(server)
    answers = {}
    for row in LabelStore(db).labels():
        answers[row["item_id"]] = answers.get(row["item_id"], 0) + (row["choice"] != "skip")
    assert max(answers.values()) <= 2
    assert sum(1 for (item, _t) in acknowledged if item <= 1000) == 2000

    # 500 more items; kill the server while all twenty are answering
    LabelStore(db).add_items(make_items(500, start=1000))
    server = start_server(db, port, labels_per_item=2)
    threads = run_all(keep_errors=False)
    while len(acknowledged) < 2000 + 300:
        time.sleep(0.01)
    stop(server, signal.SIGKILL)
    for t in threads:
        t.join()
    stored = {(row["item_id"], row["annotator_id"]): row["choice"] for row in LabelStore(db).labels()}
    for (item, token), choices in acknowledged.items():
        key = (item, ids[token])
        assert key in stored, key  # every acknowledged label survived the SIGKILL...
        tried = attempted[item, token]
        assert stored[key] in tried[len(choices) - 1:]  # ...as the last acknowledged answer, or one sent after it

    # restart on the same database: everyone finishes; every item ends with exactly k answers
    server = start_server(db, port, labels_per_item=2)
    try:
        for t in run_all():
            t.join()
        assert not errors, errors[:3]
    finally:
        stop(server)
    store = LabelStore(db)
    answers = {row["id"]: 0 for row in store.items()}
    for row in store.labels():
        answers[row["item_id"]] += row["choice"] != "skip"
    assert set(answers.values()) == {2}, {n: sum(1 for v in answers.values() if v == n) for n in set(answers.values())}
    out = tmp_path / "prefs.jsonl"
    result = subprocess.run([sys.executable, "-m", "stages.cli", "collect", "export", "--db", str(db), "--out", str(out),
                             "--ties", "tie"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all(r["chosen"] != r["rejected"] and r["prompt"][0]["content"].startswith("Question") for r in records)
    from stages.common.data import read_local_records  # and the RM stage's reader takes every record
    from stages.common.data.formats import parse_prompt_chosen_rejected

    assert len([parse_prompt_chosen_rejected(r) for r in read_local_records(str(out))]) == len(records)


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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_a_browser_labels_changes_an_answer_and_model_text_stays_text(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "labels.db"
    store = LabelStore(db, create=True)
    store.add_items(make_items(3, hostile=True))
    token = store.create_annotator("alice")
    alice = store.annotator(token)["id"]
    port = free_port()
    server = start_server(db, port)
    try:
        for path in ("/", "/static/annotate.js", "/api/next"):  # the headers the browser runs under
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request) as response:
                headers = response.headers
            assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert (headers["Cache-Control"] == "no-store") == path.startswith("/api/")

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
        # change the last answer: the page shows it, and says plainly that it changed
        browser.find_element(By.ID, "change-last").click()
        wait.until(lambda d: "your answer to item 3 is skip" in d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "prompt").text == "Question 2?" and browser.find_element(By.ID, "note").get_attribute("value") == "both fine"
        browser.find_element(By.ID, "choose-A").click()
        wait.until(lambda d: "changed: item 3 = A (was skip)" in d.find_element(By.ID, "status").text)
        assert browser.execute_script("return window.pwned === undefined")
        # the page's own script and style ran under the CSP without a single violation
        assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    finally:
        stop(server)
    store = LabelStore(db)
    rows = store._connect().execute("SELECT item_id, choice, note FROM labels WHERE annotator_id = ? ORDER BY item_id", (alice,)).fetchall()
    assert [tuple(r) for r in rows] == [(1, "B", None), (2, "tie", None), (3, "A", "both fine")]
    assert [r["choice"] for r in store.history()] == ["B", "tie", "skip", "A"]
