"""The label store: SQLite in WAL mode, every write in one transaction, committed before the server acknowledges it.

Tables: annotators (token hashes, never the tokens); items (a prompt and two responses, identified by a hash of
their content); leases (an item served to an annotator is reserved for them until the lease expires, and counts
toward its k answers meanwhile); labels (each annotator's current answer per item: A, B, tie or skip, an optional
note); label_history (every answer ever given, so a changed answer keeps its past).

Rules, enforced in the transactions below: an item is served only while its answers plus the others' live leases are
fewer than k; a label is taken only for an item leased to that annotator (or, once the lease expired, while the
item still has room), or as a change of that annotator's own earlier answer; an admin may label anything.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from stages.common.errors import ConfigError

CHOICES = ("A", "B", "tie", "skip")
SCHEMA_VERSION = 2

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
    updated REAL, UNIQUE (item_id, annotator_id));
CREATE INDEX IF NOT EXISTS labels_by_item ON labels(item_id);
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, annotator_id INTEGER NOT NULL, choice TEXT NOT NULL, note TEXT,
    seconds REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    item_id INTEGER NOT NULL REFERENCES items(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    expires REAL NOT NULL, PRIMARY KEY (item_id, annotator_id));
"""
ANSWERS_SQL = "(SELECT COUNT(*) FROM labels l WHERE l.item_id = {item} AND l.choice != 'skip')"
LEASES_SQL = "(SELECT COUNT(*) FROM leases s WHERE s.item_id = {item} AND s.expires >= :now AND s.annotator_id != :me)"


class LabelRefused(Exception):
    """A label the rules do not take (the API answers 409 with the reason)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def item_key(prompt, response_a: str, response_b: str) -> str:
    """An item's identity: its content (the two responses in either order are the same comparison), not where it came from."""
    content = json.dumps({"prompt": prompt, "responses": sorted([response_a, response_b])}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


class LabelStore:
    def __init__(self, path: str | Path, create: bool = False, read_only: bool = False):
        """``create``: make the database if it does not exist (only ``collect add``, ``token`` and ``serve --init`` do, so a
        mistyped --db is an error, not a new empty database). ``read_only``: open it for reading (stats, export)."""
        self.path, self.read_only = str(path), read_only
        if not Path(self.path).is_file():
            if not create:
                raise ConfigError(f"{self.path}: no such database (collect add, collect token or collect serve --init create one)",
                                  key="--db")
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ConfigError(f"{self.path}: cannot create the database, {Path(self.path).parent} is not a folder", key="--db") from None
        self._local = threading.local()
        try:
            db = self._connect()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if not read_only:
                if version < SCHEMA_VERSION:
                    self._migrate(db)
                with self._write() as db:  # a write that changes nothing: a database we cannot write is named now, not mid-run
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:  # not a database, or one this process may not write
            advice = " (stats and export only read it)" if "readonly" in str(err) else ""
            raise ConfigError(f"{self.path}: {err}{advice}", key="--db") from None

    def _connect(self) -> sqlite3.Connection:
        """One connection per thread; WAL lets readers and one writer work at once; FULL sync makes a commit durable."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self.read_only:  # a read-only file or folder: mode=ro, or immutable when SQLite cannot even share the WAL index
                try:
                    db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
                    db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    db = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, timeout=30.0, isolation_level=None)
            else:
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Schema 1 (round 1) -> 2: item keys become content hashes; labels get a history and an update time; leases."""
        old_items = db.execute("SELECT name FROM sqlite_master WHERE name = 'items'").fetchone() is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            if old_items and "updated" not in {r[1] for r in db.execute("PRAGMA table_info(labels)")}:
                db.execute("ALTER TABLE labels ADD COLUMN updated REAL")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            if old_items:
                seen = set()
                for row in db.execute("SELECT * FROM items ORDER BY id").fetchall():
                    key = item_key(json.loads(row["prompt"]), row["response_a"], row["response_b"])
                    key = key if key not in seen else f"{key}#{row['id']}"  # an old duplicate keeps its labels, apart
                    seen.add(key)
                    db.execute("UPDATE items SET key = ? WHERE id = ?", (key, row["id"]))
                db.execute("INSERT INTO label_history (item_id, annotator_id, choice, note, seconds, created) "
                           "SELECT item_id, annotator_id, choice, note, seconds, created FROM labels "
                           "WHERE NOT EXISTS (SELECT 1 FROM label_history)")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write(self):
        """A write transaction (BEGIN IMMEDIATE: one writer at a time, so reading the counts and writing stay atomic)."""
        return _Transaction(self._connect())

    # ------------------------------------------------------------------------------------------ annotators
    def create_annotator(self, name: str, admin: bool = False) -> str:
        """A new token for ``name`` (shown once; only its hash is stored)."""
        token = secrets.token_urlsafe(24)
        try:
            self._connect().execute("INSERT INTO annotators (name, token_hash, is_admin, created) VALUES (?, ?, ?, ?)",
                                    (name, hash_token(token), int(admin), time.time()))
        except sqlite3.IntegrityError:
            raise ConfigError(f"an annotator named {name!r} exists already", key="--name") from None
        return token

    def annotator(self, token: str | None) -> sqlite3.Row | None:
        if not token:
            return None
        return self._connect().execute("SELECT * FROM annotators WHERE token_hash = ?", (hash_token(token),)).fetchone()

    # ------------------------------------------------------------------------------------------------ items
    def add_items(self, items: list[dict]) -> int:
        """Items whose content is here already are ignored (adding the same pairs twice, from any file, adds nothing)."""
        added = 0
        with self._write() as db:
            for item in items:
                key = item_key(item["prompt"], item["response_a"], item["response_b"])
                cursor = db.execute(
                    "INSERT OR IGNORE INTO items (key, prompt, response_a, response_b, source_a, source_b, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, json.dumps(item["prompt"], ensure_ascii=False), item["response_a"], item["response_b"],
                     item.get("source_a"), item.get("source_b"), time.time()))
                added += cursor.rowcount
        return added

    def next_item(self, annotator_id: int, labels_per_item: int, lease_seconds: float) -> dict | None:
        """The item this annotator holds a lease on (renewed, if the item still has room), or a new lease on an item they
        have not answered or skipped whose answers plus the others' live leases are fewer than k (the least taken first).
        An annotator holds one lease at a time; an expired one stays (so a late answer is still theirs) until replaced."""
        now = time.time()
        params = {"me": annotator_id, "now": now, "k": labels_per_item}
        taken = f"{ANSWERS_SQL} + {LEASES_SQL}".format(item="i.id")
        with self._write() as db:
            held = db.execute(f"SELECT s.item_id FROM leases s JOIN items i ON i.id = s.item_id WHERE s.annotator_id = :me "
                              f"AND {taken} < :k ORDER BY s.item_id LIMIT 1", params).fetchone()
            if held is None:
                held = db.execute(
                    f"""SELECT i.id AS item_id FROM items i
                        WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.annotator_id = :me)
                          AND {taken} < :k
                        ORDER BY {taken}, i.id LIMIT 1""", params).fetchone()
            db.execute("DELETE FROM leases WHERE annotator_id = ? AND item_id != ?", (annotator_id, held["item_id"] if held else -1))
            if held is None:
                return None
            db.execute("INSERT OR REPLACE INTO leases (item_id, annotator_id, expires) VALUES (?, ?, ?)",
                       (held["item_id"], annotator_id, now + lease_seconds))
            return self._item(db, held["item_id"])

    def _item(self, db, item_id: int) -> dict | None:
        row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        return {"id": row["id"], "prompt": json.loads(row["prompt"]), "response_a": row["response_a"], "response_b": row["response_b"]}

    def answered_item(self, item_id: int, annotator_id: int) -> dict | None:
        """An item with this annotator's current answer (to change it), or None if they never answered it."""
        db = self._connect()
        label = db.execute("SELECT choice, note FROM labels WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id)).fetchone()
        item = self._item(db, item_id) if label is not None else None
        return {**item, "choice": label["choice"], "note": label["note"]} if item else None

    def add_label(self, item_id: int, annotator_id: int, choice: str, note: str | None = None, seconds: float | None = None,
                  labels_per_item: int = 1, admin: bool = False) -> dict:
        """Store and commit one answer. Returns {"changed": bool, "previous": earlier choice or None}; raises KeyError
        for an unknown item and LabelRefused when the rules do not take it."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise KeyError(item_id)
            answers = db.execute("SELECT " + ANSWERS_SQL.format(item="?"), (item_id,)).fetchone()[0]
            others = db.execute("SELECT " + LEASES_SQL.format(item=":item"), {"item": item_id, "now": now, "me": annotator_id}).fetchone()[0]
            previous = db.execute("SELECT choice FROM labels WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id)).fetchone()
            lease = db.execute("SELECT expires FROM leases WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id)).fetchone()
            adds_an_answer = choice != "skip" and (previous is None or previous["choice"] == "skip")
            if not admin:
                if previous is None and lease is None:
                    raise LabelRefused(f"item {item_id} was not served to you")
                live = lease is not None and lease["expires"] >= now
                if adds_an_answer and not live and answers + others >= labels_per_item:
                    raise LabelRefused(f"item {item_id} has its {labels_per_item} answer(s) already")
            if previous is None:
                db.execute("INSERT INTO labels (item_id, annotator_id, choice, note, seconds, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (item_id, annotator_id, choice, note, seconds, now))
            else:
                db.execute("UPDATE labels SET choice = ?, note = ?, seconds = ?, updated = ? WHERE item_id = ? AND annotator_id = ?",
                           (choice, note, seconds, now, item_id, annotator_id))
            db.execute("INSERT INTO label_history (item_id, annotator_id, choice, note, seconds, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (item_id, annotator_id, choice, note, seconds, now))
            db.execute("DELETE FROM leases WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id))
        return {"changed": previous is not None and previous["choice"] != choice, "previous": previous["choice"] if previous else None}

    # ------------------------------------------------------------------------------------------ reporting
    def progress(self, annotator_id: int, labels_per_item: int) -> dict:
        db = self._connect()
        done = db.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        complete = db.execute(f"SELECT COUNT(*) FROM items i WHERE {ANSWERS_SQL.format(item='i.id')} >= ?", (labels_per_item,)).fetchone()[0]
        return {"mine": done, "items": items, "complete": complete}

    def labels(self) -> list[sqlite3.Row]:
        return self._connect().execute(
            "SELECT l.*, a.name AS annotator FROM labels l JOIN annotators a ON a.id = l.annotator_id ORDER BY l.id").fetchall()

    def history(self) -> list[sqlite3.Row]:
        return self._connect().execute("SELECT * FROM label_history ORDER BY id").fetchall()

    def items(self) -> list[sqlite3.Row]:
        return self._connect().execute("SELECT * FROM items ORDER BY id").fetchall()


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
