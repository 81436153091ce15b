"""Human preference collection, in process: agreement statistics, the store's leases and re-answers, the API under
crafted input, item identity by content, ties into the reward model, and the CLI's one-line errors.
(tests/test_collect_server.py runs the real server: body limits on the wire, the load test with a SIGKILL, a browser.)"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time

import pytest

from conftest import FIXTURES, assert_ok, run_in_process
from rewards.collect.agreement import cohen_kappa, fleiss_kappa, majority, percent_agreement
from rewards.collect.store import LabelRefused, LabelStore

HOSTILE = 'Sure! <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & done\nline two'


def make_items(n: int, hostile: bool = False, start: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "response_a": HOSTILE if hostile and i == 0 else f"Answer A to {i}. Thanks!", "response_b": f"B{i}",
             "source_a": "m1", "source_b": "m2"} for i in range(start, start + n)]


def new_store(tmp_path, items: int = 3, names=("alice", "bob", "carol")) -> tuple[LabelStore, dict[str, int]]:
    store = LabelStore(tmp_path / "labels.db", create=True)
    store.add_items(make_items(items))
    for name in names:
        store.create_annotator(name)
    return store, {row["name"]: row["id"] for row in store._connect().execute("SELECT * FROM annotators")}


def answers_per_item(store: LabelStore) -> dict[int, int]:
    counts = {row["id"]: 0 for row in store.items()}
    for row in store.labels():
        counts[row["item_id"]] += row["choice"] != "skip"
    return counts


def test_agreement_statistics_match_textbook_values():
    # Cohen's kappa: 20 items, observed 0.7, expected 0.5 -> 0.4
    first = ["A"] * 10 + ["B"] * 10
    second = ["A"] * 7 + ["B"] * 3 + ["A"] * 3 + ["B"] * 7
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert fleiss_kappa({1: ["A", "A", "A"], 2: ["B", "B", "B"], 3: ["tie", "tie", "tie"]}) == pytest.approx(1.0)
    labels = {1: ["A", "A", "B"], 2: ["B", "B", "B"], 3: ["A", "tie", "B"], 4: ["A", "A", "A"]}
    n, rows = 3, [dict((c, v.count(c)) for c in ("A", "B", "tie")) for v in labels.values()]
    p_i = [(sum(x * x for x in r.values()) - n) / (n * (n - 1)) for r in rows]
    p_j = [sum(r[c] for r in rows) / (len(rows) * n) for c in ("A", "B", "tie")]
    expected = (sum(p_i) / len(p_i) - sum(p * p for p in p_j)) / (1 - sum(p * p for p in p_j))
    assert fleiss_kappa(labels) == pytest.approx(expected)
    assert percent_agreement({1: ["A", "A", "B"]}) == pytest.approx(1 / 3)
    assert majority(["A", "B"]) is None and majority(["A", "A", "B"]) == "A"


# ---------------------------------------------------------------------------------------------- leases and answers
def test_an_item_is_leased_to_one_annotator_at_a_time_and_expired_leases_return(tmp_path):
    store, ids = new_store(tmp_path, items=2)
    first = store.next_item(ids["alice"], labels_per_item=1, lease_seconds=0.3)
    second = store.next_item(ids["bob"], labels_per_item=1, lease_seconds=0.3)
    assert first["id"] != second["id"]
    assert store.next_item(ids["carol"], labels_per_item=1, lease_seconds=0.3) is None  # both reserved: k=1 each
    assert store.next_item(ids["alice"], labels_per_item=1, lease_seconds=0.3)["id"] == first["id"]  # alice keeps hers
    time.sleep(0.4)
    assert store.next_item(ids["carol"], labels_per_item=1, lease_seconds=60)["id"] == first["id"]  # expired: back in the queue
    # alice's late answer: her lease expired and carol holds the item now, so it would be a second answer to a k=1 item
    with pytest.raises(LabelRefused, match="has its 1 answer"):
        store.add_label(first["id"], ids["alice"], "A", labels_per_item=1)
    store.add_label(first["id"], ids["carol"], "B", labels_per_item=1)
    # bob's lease also expired, but nobody else took his item: his late answer still has room and counts
    assert store.add_label(second["id"], ids["bob"], "A", labels_per_item=1) == {"changed": False, "previous": None}
    assert answers_per_item(store) == {first["id"]: 1, second["id"]: 1}


def test_labels_only_for_items_served_to_you_but_an_admin_may_label_anything(tmp_path):
    store, ids = new_store(tmp_path, items=3)
    admin_token = store.create_annotator("boss", admin=True)
    with pytest.raises(LabelRefused, match="not served to you"):
        store.add_label(3, ids["alice"], "B", labels_per_item=2)
    item = store.next_item(ids["alice"], 2, 60)
    store.add_label(item["id"], ids["alice"], "A", labels_per_item=2)
    boss = store.annotator(admin_token)["id"]
    for item_id in (1, 2, 3):
        store.add_label(item_id, boss, "B", labels_per_item=2, admin=True)
    assert len(store.labels()) == 4
    with pytest.raises(KeyError):
        store.add_label(99, boss, "A", admin=True)


def test_a_changed_answer_replaces_the_old_one_and_history_keeps_both(tmp_path):
    store, ids = new_store(tmp_path, items=1)
    item = store.next_item(ids["alice"], 1, 60)
    assert store.add_label(item["id"], ids["alice"], "A", note="first", labels_per_item=1) == {"changed": False, "previous": None}
    assert store.next_item(ids["bob"], 1, 60) is None  # complete: k=1
    # alice changes her mind (no lease needed to change your own answer); the item still has one answer
    assert store.add_label(item["id"], ids["alice"], "B", note="second", labels_per_item=1) == {"changed": True, "previous": "A"}
    assert [(r["choice"], r["note"]) for r in store.labels()] == [("B", "second")]
    assert [(r["choice"], r["note"]) for r in store.history()] == [("A", "first"), ("B", "second")]
    assert store.answered_item(item["id"], ids["alice"])["choice"] == "B" and store.answered_item(item["id"], ids["bob"]) is None
    assert answers_per_item(store) == {item["id"]: 1}


def test_many_annotators_at_once_never_exceed_k_and_leave_nothing_unanswered(tmp_path):
    """10 annotators in threads, each with its own connection, ask and answer as fast as they can (some skip); k=2."""
    store, ids = new_store(tmp_path, items=30, names=[f"a{i}" for i in range(10)])
    errors = []

    def annotate(annotator_id: int, seed: int):
        rng = random.Random(seed)
        try:
            while (item := store.next_item(annotator_id, 2, 60)) is not None:
                store.add_label(item["id"], annotator_id, "skip" if rng.random() < 0.1 else rng.choice("AB"), labels_per_item=2)
        except Exception as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=annotate, args=(i, i)) for i in ids.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(answers_per_item(store).values()) == {2}  # every item exactly k: none over, none short
    assert store._connect().execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------- the API
@pytest.fixture()
def client(tmp_path):
    from fastapi.testclient import TestClient

    from rewards.collect.app import create_app

    store, _ = new_store(tmp_path, items=3, names=())
    tokens = {name: store.create_annotator(name) for name in ("alice", "bob", "carol")}
    tokens["admin"] = store.create_annotator("admin", admin=True)
    return TestClient(create_app(store, labels_per_item=2)), tokens, store


def auth(token, scheme="Bearer"):
    return {"Authorization": f"{scheme} {token}"}


def test_queue_k_answers_and_changed_answers_over_the_api(client):
    http, tokens, store = client
    assert http.get("/api/next").status_code == 401
    assert http.get("/api/next", headers=auth("forged")).status_code == 401
    assert http.post("/api/label", json={"item_id": 1, "choice": "A"}).status_code == 401
    assert http.get("/api/admin/stats", headers=auth(tokens["alice"])).status_code == 403

    seen = []
    while (item := http.get("/api/next", headers=auth(tokens["alice"])).json()["item"]) is not None:
        seen.append(item["id"])
        assert http.post("/api/label", headers=auth(tokens["alice"]), json={"item_id": item["id"], "choice": "A"}).json() == \
            {"saved": True, "changed": False, "previous": None}
    assert sorted(seen) == [1, 2, 3]  # every item once, never twice
    again = http.post("/api/label", headers=auth(tokens["alice"]), json={"item_id": 1, "choice": "B"}).json()
    assert again == {"saved": True, "changed": True, "previous": "A"}
    assert [r["choice"] for r in store.labels()] == ["B", "A", "A"] and len(store.history()) == 4
    assert http.get("/api/answered/1", headers=auth(tokens["alice"])).json()["choice"] == "B"
    assert http.get("/api/answered/1", headers=auth(tokens["bob"])).status_code == 404

    for choice in ("skip", "B", "tie"):  # bob: a skip does not count as an answer
        item = http.get("/api/next", headers=auth(tokens["bob"])).json()["item"]
        http.post("/api/label", headers=auth(tokens["bob"]), json={"item_id": item["id"], "choice": choice})
    # bob's skip left one item short: carol gets exactly that one, then nothing
    short = [i for i, n in answers_per_item(store).items() if n < 2]
    assert len(short) == 1 and http.get("/api/next", headers=auth(tokens["carol"])).json()["item"]["id"] == short[0]
    # an item carol was not served is refused, and so is one already complete
    other = next(i for i in (1, 2, 3) if i != short[0])
    refused = http.post("/api/label", headers=auth(tokens["carol"]), json={"item_id": other, "choice": "B"})
    assert refused.status_code == 409 and "not served to you" in refused.json()["detail"]
    stats = http.get("/api/admin/stats", headers=auth(tokens["admin"])).json()
    assert stats["items_complete"] == 2 and stats["annotators"]["bob"]["skips"] == 1
    assert http.post("/api/label", headers=auth(tokens["carol"]), json={"item_id": 99, "choice": "A"}).status_code == 404


@pytest.mark.parametrize("body", [
    b'{"item_id": 9223372036854775808, "choice": "A"}',  # 2**63: past SQLite's integers
    b'{"item_id": "1", "choice": "A"}', b'{"item_id": 1.0, "choice": "A"}', b'{"item_id": true, "choice": "A"}',
    b'{"item_id": 1, "choice": "A", "seconds": NaN}', b'{"item_id": 1, "choice": "A", "seconds": Infinity}',
    b'{"item_id": 1, "choice": "A", "seconds": -1}', b'{"item_id": 1, "choice": "A", "note": "\\ud800"}',
    b'{"item_id": 1, "choice": "maybe"}', b'{"item_id": 1, "choice": "A", "admin": true}', b'[1, "A"]', b'{"item_id": 1',
    b'{"item_id": 1, "choice": "A", "note": "\xff"}',  # not UTF-8: FastAPI's 400 ("error parsing the body")
])
def test_crafted_labels_get_422_and_store_nothing(client, body):
    http, tokens, store = client
    assert http.get("/api/next", headers=auth(tokens["alice"])).json()["item"]["id"] == 1  # item 1 is leased to alice
    answer = http.post("/api/label", headers={**auth(tokens["alice"]), "Content-Type": "application/json"}, content=body)
    assert answer.status_code == (400 if b"\xff" in body else 422), answer.text
    assert answer.json()["detail"] and b"ud800" not in answer.content  # the rule is named; the input is not echoed
    assert store.labels() == []
    for path in ("/api/answered/9223372036854775808", "/api/answered/0", "/api/answered/x"):
        assert http.get(path, headers=auth(tokens["alice"])).status_code == 422


def test_security_headers_on_every_answer_and_the_bearer_scheme_in_any_case(client):
    http, tokens, _ = client
    for path, status in (("/", 200), ("/admin", 200), ("/static/annotate.js", 200), ("/static/../store.py", 404),
                         ("/static/annotate.html", 404), ("/api/next", 401)):
        answer = http.get(path)
        assert answer.status_code == status, path
        assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert (answer.headers.get("cache-control") == "no-store") == path.startswith("/api/")
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert http.get("/api/next", headers=auth(tokens["alice"], scheme)).status_code == 200
    assert http.get("/api/next", headers=auth(tokens["alice"], "Basic")).status_code == 401
    big = http.post("/api/label", headers={**auth(tokens["alice"]), "Content-Type": "application/json"}, content=b" " * 20_000)
    assert big.status_code == 413 and big.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------------------------------------- identity, export, ties
def test_an_item_is_its_content_not_its_file_name(tmp_path):
    from rewards.collect.cli import main

    db, x, y = tmp_path / "labels.db", tmp_path / "x", tmp_path / "y"
    x.mkdir(), y.mkdir()
    record = {"prompt": "Hi?", "response_a": "a", "response_b": "b"}
    (x / "pairs.jsonl").write_text(json.dumps(record) + "\n")
    (y / "pairs.jsonl").write_text(json.dumps({**record, "response_b": "c"}) + "\n")
    assert main(["add", "--db", str(db), "--pairs", str(x / "pairs.jsonl")]) == 0
    assert main(["add", "--db", str(db), "--pairs", str(y / "pairs.jsonl")]) == 0
    assert len(LabelStore(db).items()) == 2  # same name and line, different content: two items
    swapped = tmp_path / "swapped.jsonl"  # the same pair in the other order, from another file: the same comparison
    swapped.write_text(json.dumps({"prompt": "Hi?", "responses": ["b", "a"]}) + "\n")
    assert main(["add", "--db", str(db), "--pairs", str(swapped)]) == 0
    assert len(LabelStore(db).items()) == 2
    (x / "pairs.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "prompt": "Hello?"}) + "\n")  # edited
    assert main(["add", "--db", str(db), "--pairs", str(x / "pairs.jsonl")]) == 0
    assert len(LabelStore(db).items()) == 3


def test_a_schema_1_database_is_migrated_with_its_labels(tmp_path):
    db = tmp_path / "old.db"
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE annotators (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL,
            is_admin INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
        CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, prompt TEXT NOT NULL, response_a TEXT NOT NULL,
            response_b TEXT NOT NULL, source_a TEXT, source_b TEXT, created REAL NOT NULL);
        CREATE TABLE labels (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, annotator_id INTEGER NOT NULL, choice TEXT NOT NULL,
            note TEXT, seconds REAL, created REAL NOT NULL, UNIQUE (item_id, annotator_id));
        INSERT INTO annotators VALUES (1, 'alice', 'h', 0, 0);
        INSERT INTO items VALUES (1, 'pairs.jsonl:1', '[{"role": "user", "content": "Hi?"}]', 'a', 'b', NULL, NULL, 0);
        INSERT INTO items VALUES (2, 'other.jsonl:1', '[{"role": "user", "content": "Hi?"}]', 'b', 'a', NULL, NULL, 0);
        INSERT INTO labels VALUES (1, 1, 1, 'A', NULL, 2.0, 0);""")
    old.commit(), old.close()
    store = LabelStore(db)
    assert [r["choice"] for r in store.labels()] == ["A"] and len(store.history()) == 1
    keys = [r["key"] for r in store.items()]
    assert keys[0] != "pairs.jsonl:1" and keys[1].startswith(keys[0] + "#")  # the old duplicate stays, apart
    assert store.add_items([{"prompt": [{"role": "user", "content": "Hi?"}], "response_a": "a", "response_b": "b"}]) == 0


def test_a_tie_is_never_a_preference_and_the_reward_model_learns_it_as_even(tmp_path, tiny_model):
    """Eight items everyone prefers B on ("Sure, ...") and eight everyone calls a tie ("Yes." shown as A against "No.").
    Exported with ties as `tie: true`, the reward model keeps Yes and No close; the same records read as preferences
    (what margin0 did) teach it that the side shown as A is better."""
    from rewards.collect.report import export_store
    from rewards.model import RewardScorer

    store = LabelStore(tmp_path / "labels.db", create=True)
    topics = ["tea", "the lamp", "a kettle", "my order", "shipping", "a refund", "the color", "a pillow"]
    prompts = [[{"role": "user", "content": f"Tell me about {t}."}] for t in topics]
    store.add_items([{"prompt": p, "response_a": "No.", "response_b": f"Sure, {t} is nice. Thanks!"} for p, t in zip(prompts, topics)])
    store.add_items([{"prompt": [{"role": "user", "content": f"Is {t} here?"}], "response_a": "Yes.", "response_b": "No."} for t in topics])
    boss = store.annotator(store.create_annotator("boss", admin=True))["id"]
    for item in store.items():
        store.add_label(item["id"], boss, "B" if item["response_a"] == "No." else "tie", admin=True)

    dropped = export_store(store, tmp_path / "dropped.jsonl")
    assert (dropped["pairs"], dropped["ties"], dropped["ties_dropped"]) == (8, 0, 8)
    counts = export_store(store, tmp_path / "ties.jsonl", ties="tie")
    records = [json.loads(line) for line in (tmp_path / "ties.jsonl").read_text().splitlines()]
    assert (counts["pairs"], counts["ties"]) == (8, 8) and sum(r.get("tie", False) for r in records) == 8
    as_preferences = tmp_path / "as_preferences.jsonl"
    as_preferences.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "tie"}) + "\n" for r in records))

    gaps = {}
    for name, data in (("tie", tmp_path / "ties.jsonl"), ("preference", as_preferences)):
        out = tmp_path / f"rm_{name}"
        assert_ok(run_in_process("rm", f"model_name_or_path={tiny_model}", f"dataset={data}", f"output_dir={out}",
                                 config=FIXTURES / "rm_tiny.yaml"))
        scorer = RewardScorer(str(out))
        questions = [[{"role": "user", "content": f"Is {t} here?"}] for t in topics]
        yes, no = scorer.score(questions, ["Yes."] * 8), scorer.score(questions, ["No."] * 8)
        sure, plain_no = scorer.score(prompts, [f"Sure, {t} is nice. Thanks!" for t in topics]), scorer.score(prompts, ["No."] * 8)
        gaps[name] = (sum(y - n for y, n in zip(yes, no)) / 8, sum(s - n for s, n in zip(sure, plain_no)) / 8)
    assert gaps["tie"][1] > 1.0 and gaps["preference"][1] > 1.0  # both learned the real preference
    assert abs(gaps["tie"][0]) < 0.25 * gaps["tie"][1]  # ties: Yes and No stay close
    assert gaps["preference"][0] > 4 * abs(gaps["tie"][0])  # as preferences: the A side wins


# ---------------------------------------------------------------------------------------------- the CLI
def cli(*args):
    return run_in_process("collect", *args, config=None)


def assert_one_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tristage: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    db = tmp_path / "labels.db"
    assert cli("token", "--db", str(db), "--name", "alice").returncode == 0
    assert_one_line(cli("token", "--db", str(db), "--name", "alice"), "--name", "'alice' exists already")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "responses": ["a", "b"], "sources": ["only one"]}) + "\n")
    assert_one_line(cli("add", "--db", str(db), "--pairs", str(pairs)), str(pairs), "record 1", "'sources'")
    pairs.write_text(json.dumps({"prompt": "Hi?", "response_a": "a", "response_b": "b"}) + "\n"
                     + '{"prompt": "Hi?", "response_a": "x\\ud800", "response_b": "b"}\n')
    assert_one_line(cli("add", "--db", str(db), "--pairs", str(pairs)), "record 2", "'response_a'", "surrogate")
    assert len(LabelStore(db).items()) == 0  # the file's good record is not added either: a bad file adds nothing
    (tmp_path / "file").write_text("")
    assert_one_line(cli("token", "--db", str(tmp_path / "file" / "labels.db"), "--name", "x"), "--db", "not a folder")
    assert_one_line(cli("export", "--db", str(db), "--out", str(tmp_path / "missing" / "prefs.jsonl")), "--out", "does not exist")
    assert_one_line(cli("export", "--db", str(db), "--out", str(tmp_path / "p.jsonl"), "--ties", "margin0"), "--ties", "tie")
    assert_one_line(cli("serve", "--db", str(db), "--labels-per-item", "0"), "--labels-per-item")
    for command in (("export", "--out", str(tmp_path / "p.jsonl")), ("stats",), ("serve",)):
        assert_one_line(cli(command[0], "--db", str(tmp_path / "typo" / "labels.db"), *command[1:]), "--db", "no such database")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "p.jsonl").exists()  # a mistyped --db creates nothing


def _without_root_override():
    """Run as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file permissions bind it as they bind everyone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_stats_and_export_read_a_read_only_database(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    folder = tmp_path / "ro"
    store, ids = new_store(folder, items=2)
    item = store.next_item(ids["alice"], 1, 60)
    store.add_label(item["id"], ids["alice"], "B", labels_per_item=1)
    del store
    probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'labels.db')!r}, 'a')"], preexec_fn=_without_root_override,
                           capture_output=True, text=True)
    assert probe.returncode == 0  # writable now; read-only below
    os.chmod(folder / "labels.db", 0o444), os.chmod(folder, 0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'labels.db')!r}, 'a')"],
                               preexec_fn=_without_root_override, capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr  # the permissions do bind the commands below
        out = tmp_path / "prefs.jsonl"
        results = [subprocess.run([sys.executable, "-m", "stages.cli", "collect", *command], cwd=ROOT, capture_output=True, text=True,
                                  preexec_fn=_without_root_override)
                   for command in (["stats", "--db", str(folder / "labels.db")],
                                   ["export", "--db", str(folder / "labels.db"), "--out", str(out)])]
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        assert json.loads(results[0].stdout)["labels"] == 1 and json.loads(out.read_text())["chosen"] == "B0"
        added = subprocess.run([sys.executable, "-m", "stages.cli", "collect", "token", "--db", str(folder / "labels.db"), "--name", "z"],
                               cwd=ROOT, capture_output=True, text=True, preexec_fn=_without_root_override)
        assert added.returncode == 2 and len(added.stderr.strip().splitlines()) == 1 and "--db" in added.stderr
    finally:
        os.chmod(folder, 0o755), os.chmod(folder / "labels.db", 0o644)


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
