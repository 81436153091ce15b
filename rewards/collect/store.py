"""The label store: SQLite in WAL mode. A label is committed before the server acknowledges it, so every
acknowledged label survives a crash; one label per (item, annotator) is a UNIQUE constraint, so a retried
request cannot store a label twice.

Tables: annotators (token hashes, never the tokens), items (a prompt and two responses, with where each
came from), labels (A, B, tie or skip, an optional note).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

CHOICES = ("A", "B", "tie", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL, is_admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    source_a TEXT, source_b TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')), note TEXT, seconds REAL, created REAL NOT NULL,
    UNIQUE (item_id, annotator_id));
CREATE INDEX IF NOT EXISTS labels_by_item ON labels(item_id);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LabelStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """One connection per thread; WAL lets readers and one writer work at once; FULL sync makes a commit durable."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    # ------------------------------------------------------------------------------------------ annotators
    def create_annotator(self, name: str, admin: bool = False) -> str:
        """A new token for ``name`` (shown once; only its hash is stored)."""
        token = secrets.token_urlsafe(24)
        db = self._connect()
        try:
            db.execute("INSERT INTO annotators (name, token_hash, is_admin, created) VALUES (?, ?, ?, ?)",
                       (name, hash_token(token), int(admin), time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"an annotator named {name!r} exists already") from None
        return token

    def annotator(self, token: str | None) -> sqlite3.Row | None:
        if not token:
            return None
        return self._connect().execute("SELECT * FROM annotators WHERE token_hash = ?", (hash_token(token),)).fetchone()

    # ------------------------------------------------------------------------------------------------ items
    def add_items(self, items: list[dict]) -> int:
        """Items with a ``key`` seen before are ignored (adding the same file twice adds nothing)."""
        db = self._connect()
        added = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO items (key, prompt, response_a, response_b, source_a, source_b, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item["key"], json.dumps(item["prompt"], ensure_ascii=False), item["response_a"], item["response_b"],
                     item.get("source_a"), item.get("source_b"), time.time()))
                added += cursor.rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return added

    def next_item(self, annotator_id: int, labels_per_item: int) -> dict | None:
        """An item this annotator has not seen, among those with fewer than k answers (skips do not count),
        the least-labeled first."""
        row = self._connect().execute(
            """SELECT i.*, (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id AND l.choice != 'skip') AS answers
               FROM items i
               WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.annotator_id = ?)
                 AND (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id AND l.choice != 'skip') < ?
               ORDER BY answers, i.id LIMIT 1""", (annotator_id, labels_per_item)).fetchone()
        if row is None:
            return None
        return {"id": row["id"], "prompt": json.loads(row["prompt"]), "response_a": row["response_a"], "response_b": row["response_b"]}

    def add_label(self, item_id: int, annotator_id: int, choice: str, note: str | None = None, seconds: float | None = None) -> bool:
        """Stores and commits one label; False when this annotator already labeled the item (a retry)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        db = self._connect()
        if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
            raise KeyError(item_id)
        cursor = db.execute("INSERT OR IGNORE INTO labels (item_id, annotator_id, choice, note, seconds, created) VALUES (?, ?, ?, ?, ?, ?)",
                            (item_id, annotator_id, choice, note, seconds, time.time()))
        return cursor.rowcount == 1

    # ------------------------------------------------------------------------------------------ reporting
    def progress(self, annotator_id: int, labels_per_item: int) -> dict:
        db = self._connect()
        done = db.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        complete = db.execute("SELECT COUNT(*) FROM items i WHERE (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id "
                              "AND l.choice != 'skip') >= ?", (labels_per_item,)).fetchone()[0]
        return {"mine": done, "items": items, "complete": complete}

    def labels(self) -> list[sqlite3.Row]:
        return self._connect().execute(
            "SELECT l.*, a.name AS annotator FROM labels l JOIN annotators a ON a.id = l.annotator_id ORDER BY l.id").fetchall()

    def items(self) -> list[sqlite3.Row]:
        return self._connect().execute("SELECT * FROM items ORDER BY id").fetchall()
