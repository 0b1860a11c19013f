"""The enrolled-faces gallery, persisted in one SQLite file (standard library only).

Layout (schema version 1)::

  schema_version(version)                       one row
  meta(key PRIMARY KEY, value)                  JSON values: "fingerprint", "dim", "threshold"
  identities(id, name UNIQUE, created, threshold NULL)
  embeddings(id, identity_id -> identities(id) ON DELETE CASCADE, vector BLOB,
             source_path, source_sha256, box, created)

Embeddings are stored as raw little-endian float32 bytes (``ndarray.tobytes``)
and read back with ``np.frombuffer`` after a length check (never pickle). The
encoder fingerprint (e.g. model name, weights sha256, preprocessing) is a
JSON object stored on the first enrollment; a gallery opened or enrolled into
with a different fingerprint raises :class:`GalleryError` naming both, so
embeddings of two encoders never mix.

Every change (enroll, remove, rename, set_threshold) runs in its own
``BEGIN IMMEDIATE`` transaction in WAL mode with ``synchronous=FULL``: a
process killed in the middle of a change leaves the file exactly as it was
before that change (SQLite rolls the unfinished transaction back on the next
open), and a finished change survives a power cut.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["Gallery", "GalleryError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL,
  threshold REAL
);
CREATE TABLE IF NOT EXISTS embeddings (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
  vector BLOB NOT NULL,
  source_path TEXT,
  source_sha256 TEXT,
  box TEXT,
  created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS embeddings_identity ON embeddings(identity_id);
"""


class GalleryError(ValueError):
  """The gallery cannot do what was asked (wrong encoder, unknown name, bad file, ...)."""


def _now() -> str:
  return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _canonical(fingerprint: dict) -> str:
  try:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
  except (TypeError, ValueError) as e:
    raise GalleryError(f"fingerprint: must be a JSON-serializable dict, got {fingerprint!r} ({e})") from e


def _check_name(name: Any, what: str = "name") -> str:
  if not isinstance(name, str) or not name.strip():
    raise GalleryError(f"{what}: expected a non-empty string, got {name!r}")
  if name != name.strip():
    raise GalleryError(f"{what}: {name!r} has leading or trailing whitespace")
  return name


def _check_box(box: Any, where: str) -> str | None:
  if box is None:
    return None
  arr = np.asarray(box)
  if arr.shape != (4,) or not np.issubdtype(arr.dtype, np.integer):
    raise GalleryError(f"{where}: box must be 4 ints (left, top, right, bottom) or None, got {box!r}")
  return json.dumps([int(v) for v in arr])


class Gallery:
  """Enrolled identities and their face embeddings in the SQLite file ``path``.

  Args:
    path: the gallery file; created (with its schema) when absent. Its folder
      must exist.
    fingerprint: the encoder that made (or will make) the embeddings, a
      JSON-serializable dict. When the gallery already holds one and they
      differ, opening fails. None opens any gallery (listing, removing,
      renaming, searching what is stored), but :meth:`enroll` refuses: new
      embeddings are only accepted with a fingerprint to check.

  Raises:
    GalleryError: the file is not a gallery (not SQLite, newer schema),
      its folder does not exist, or the fingerprints differ.
  """

  # Test hook: called inside the enroll transaction after the rows are
  # written and before COMMIT (the killed-process test pauses here).
  _before_commit: Callable[[], None] | None = None

  def __init__(self, path: str, fingerprint: dict | None = None):
    self.path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(folder):
      raise GalleryError(f"gallery {self.path}: folder {folder} does not exist")
    if os.path.isdir(self.path):
      raise GalleryError(f"gallery {self.path}: is a folder, expected a gallery file")
    if fingerprint is not None and not isinstance(fingerprint, dict):
      raise GalleryError(f"fingerprint: expected a dict or None, got {type(fingerprint).__name__}")
    self._wanted = _canonical(fingerprint) if fingerprint is not None else None
    try:
      # isolation_level=None: no implicit transactions; each change opens its own.
      self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
    except sqlite3.Error as e:
      raise GalleryError(f"gallery {self.path}: cannot be opened ({e})") from e
    try:
      self._setup()
    except sqlite3.DatabaseError as e:
      self._db.close()
      raise GalleryError(f"gallery {self.path}: not a gallery file or damaged ({e})") from e
    except GalleryError:
      self._db.close()
      raise

  # ------------------------------------------------------------------ setup

  def _setup(self) -> None:
    db = self._db
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "schema_version" not in tables:
      if tables - {"sqlite_sequence"}:
        raise GalleryError(f"gallery {self.path}: an SQLite file, but not a jaxface gallery "
                           f"(tables {sorted(tables)})")
      with self._transaction():
        # Statement by statement: executescript() would COMMIT the transaction.
        for statement in filter(str.strip, _SCHEMA.split(";")):
          db.execute(statement)
        # Another process may have created the schema while we waited for the lock.
        if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
          db.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))
    row = db.execute("SELECT version FROM schema_version").fetchone()
    if row is None or row[0] != SCHEMA_VERSION:
      raise GalleryError(f"gallery {self.path}: schema version {row and row[0]} is not the "
                         f"supported version {SCHEMA_VERSION}")
    stored = self._meta("fingerprint")
    if self._wanted is not None and stored is not None and stored != self._wanted:
      raise GalleryError(
          f"gallery {self.path} was built with encoder {stored}, but this encoder is "
          f"{self._wanted}; use the same encoder or a new gallery file")

  class _Tx:
    def __init__(self, db: sqlite3.Connection, path: str):
      self.db = db
      self.path = path

    def __enter__(self):
      try:
        self.db.execute("BEGIN IMMEDIATE")
      except sqlite3.OperationalError as e:  # another process holds the write lock
        raise GalleryError(f"gallery {self.path}: cannot start a change ({e}); another process "
                           f"is writing to it") from e
      return self.db

    def __exit__(self, exc_type, exc, tb):
      if exc_type is None:
        self.db.execute("COMMIT")
      else:
        self.db.execute("ROLLBACK")
      return False

  def _transaction(self) -> "_Tx":
    return Gallery._Tx(self._db, self.path)

  def _meta(self, key: str) -> str | None:
    row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]

  def _set_meta(self, key: str, value: str) -> None:
    self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

  def _identity_id(self, identity: str | int, what: str = "identity") -> int:
    if isinstance(identity, (int, np.integer)) and not isinstance(identity, bool):
      row = self._db.execute("SELECT id FROM identities WHERE id = ?", (int(identity),)).fetchone()
    else:
      _check_name(identity, what)
      row = self._db.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()
    if row is None:
      known = self.num_identities()
      raise GalleryError(f"{what} {identity!r} is not enrolled in gallery {self.path} "
                         f"({known} identities enrolled)")
    return int(row[0])

  # ------------------------------------------------------------- properties

  @property
  def fingerprint(self) -> dict | None:
    """The stored encoder fingerprint (None before the first enrollment)."""
    stored = self._meta("fingerprint")
    return None if stored is None else json.loads(stored)

  @property
  def dim(self) -> int | None:
    """Embedding length (None before the first enrollment)."""
    stored = self._meta("dim")
    return None if stored is None else int(json.loads(stored))

  def num_identities(self) -> int:
    return int(self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

  def __len__(self) -> int:
    """Number of enrolled embeddings."""
    return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

  # ---------------------------------------------------------------- changes

  def enroll(self, name: str, embeddings: Any, sources: Iterable[dict] | None = None) -> int:
    """Adds embeddings to identity ``name`` (created when new), in one transaction.

    Args:
      name: identity name (non-empty, no surrounding whitespace).
      embeddings: [N, D] float32 (N >= 1; other real dtypes are converted),
        all finite; D must equal the gallery's dimension once set.
      sources: N dicts with optional keys ``path`` (str), ``sha256`` (hex str)
        and ``box`` (4 ints l, t, r, b); None for no source information.

    Returns:
      The identity id.

    Raises:
      GalleryError: the gallery was opened without a fingerprint, a
        dimension mismatch, bad embeddings or sources.
    """
    _check_name(name)
    emb = np.asarray(embeddings)
    if emb.ndim == 1:
      raise GalleryError(f"embeddings for {name!r}: expected [N, D], got a 1-D array of shape "
                         f"{emb.shape}; use embeddings[None] for one face")
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
      raise GalleryError(f"embeddings for {name!r}: expected a non-empty [N, D] array, got shape {emb.shape}")
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
      raise GalleryError(f"embeddings for {name!r}: expected real numbers, got dtype {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype="<f4")
    if not np.isfinite(emb).all():
      raise GalleryError(f"embeddings for {name!r}: contain NaN or infinite values")
    n, dim = emb.shape
    srcs = [{} for _ in range(n)] if sources is None else list(sources)
    if len(srcs) != n:
      raise GalleryError(f"sources for {name!r}: {len(srcs)} sources for {n} embeddings")
    rows_meta = []
    for i, s in enumerate(srcs):
      where = f"sources[{i}] for {name!r}"
      if not isinstance(s, dict) or set(s) - {"path", "sha256", "box"}:
        raise GalleryError(f"{where}: expected a dict with keys path, sha256, box, got {s!r}")
      path, sha = s.get("path"), s.get("sha256")
      if path is not None and not isinstance(path, str):
        raise GalleryError(f"{where}: path must be a string, got {path!r}")
      if sha is not None and not isinstance(sha, str):
        raise GalleryError(f"{where}: sha256 must be a hex string, got {sha!r}")
      rows_meta.append((path, sha, _check_box(s.get("box"), where)))
    created = _now()
    with self._transaction() as db:
      if self._wanted is None:
        raise GalleryError(f"gallery {self.path}: enrolling needs the encoder fingerprint, to "
                           f"refuse embeddings of another encoder (open it with fingerprint=...)")
      stored = self._meta("fingerprint")
      if stored is None:
        self._set_meta("fingerprint", self._wanted)
      elif stored != self._wanted:
        raise GalleryError(f"gallery {self.path} was built with encoder {stored}, but these "
                           f"embeddings come from {self._wanted}")
      stored_dim = self._meta("dim")
      if stored_dim is None:
        self._set_meta("dim", json.dumps(dim))
      elif int(json.loads(stored_dim)) != dim:
        raise GalleryError(f"embeddings for {name!r}: {dim} dimensions, the gallery {self.path} "
                           f"holds {stored_dim}-dimensional embeddings")
      row = db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
      if row is None:
        identity_id = int(db.execute("INSERT INTO identities(name, created) VALUES (?, ?)",
                                     (name, created)).lastrowid)
      else:
        identity_id = int(row[0])
      db.executemany(
          "INSERT INTO embeddings(identity_id, vector, source_path, source_sha256, box, created) "
          "VALUES (?, ?, ?, ?, ?, ?)",
          ((identity_id, emb[i].tobytes(), *rows_meta[i], created) for i in range(n)))
      if Gallery._before_commit is not None:
        Gallery._before_commit()
    return identity_id

  def remove(self, name: str) -> int:
    """Removes identity ``name`` (or id) and all its embeddings; returns how many embeddings went."""
    with self._transaction() as db:
      identity_id = self._identity_id(name)
      count = db.execute("SELECT COUNT(*) FROM embeddings WHERE identity_id = ?",
                         (identity_id,)).fetchone()[0]
      db.execute("DELETE FROM identities WHERE id = ?", (identity_id,))  # cascades
    return int(count)

  def rename(self, old: str, new: str) -> None:
    """Renames identity ``old`` to ``new`` (which must not exist yet)."""
    _check_name(new, "new name")
    with self._transaction() as db:
      identity_id = self._identity_id(old)
      if db.execute("SELECT 1 FROM identities WHERE name = ?", (new,)).fetchone():
        raise GalleryError(f"cannot rename {old!r} to {new!r}: {new!r} is already enrolled "
                           f"in gallery {self.path}")
      db.execute("UPDATE identities SET name = ? WHERE id = ?", (new, identity_id))

  def set_threshold(self, value: float | None, *, identity: str | int | None = None) -> None:
    """Stores the global threshold (or ``identity``'s own; None clears it).

    Thresholds are Euclidean distances: same person when distance <= threshold.
    """
    if value is not None:
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
          or not np.isfinite(value) or value < 0:
        raise GalleryError(f"threshold: expected a finite number >= 0 or None, got {value!r}")
      value = float(value)
    with self._transaction() as db:
      if identity is None:
        if value is None:
          db.execute("DELETE FROM meta WHERE key = 'threshold'")
        else:
          self._set_meta("threshold", json.dumps(value))
      else:
        identity_id = self._identity_id(identity)
        db.execute("UPDATE identities SET threshold = ? WHERE id = ?", (value, identity_id))

  def set_thresholds(self, value: float, per_identity: dict | None = None) -> None:
    """Replaces all thresholds in one transaction: the global ``value``, and
    per-identity ones (``{identity id or name: threshold}``); every identity
    not in ``per_identity`` loses its own threshold, since it was fitted
    around the old global one. A killed process leaves the old set intact.
    """
    def check(v, what):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
          or not np.isfinite(v) or v < 0:
        raise GalleryError(f"{what}: expected a finite number >= 0, got {v!r}")
      return float(v)
    value = check(value, "threshold")
    per_identity = {k: check(v, f"threshold of {k!r}") for k, v in (per_identity or {}).items()}
    with self._transaction() as db:
      self._set_meta("threshold", json.dumps(value))
      db.execute("UPDATE identities SET threshold = NULL")
      for identity, v in per_identity.items():
        db.execute("UPDATE identities SET threshold = ? WHERE id = ?",
                   (v, self._identity_id(identity)))

  # ------------------------------------------------------------------ reads

  def threshold(self, identity: str | int | None = None) -> float | None:
    """The global threshold, or ``identity``'s own (None when not set)."""
    if identity is None:
      stored = self._meta("threshold")
      return None if stored is None else float(json.loads(stored))
    identity_id = self._identity_id(identity)
    row = self._db.execute("SELECT threshold FROM identities WHERE id = ?", (identity_id,)).fetchone()
    return None if row[0] is None else float(row[0])

  def identity_thresholds(self) -> dict[int, float]:
    """Per-identity thresholds that are set: {identity id: threshold}."""
    rows = self._db.execute("SELECT id, threshold FROM identities WHERE threshold IS NOT NULL")
    return {int(i): float(t) for i, t in rows}

  def row_thresholds(self, identity_ids: Any, default: float) -> np.ndarray:
    """[M] float32 threshold for each gallery row: its identity's own, else ``default``.

    Pass the ids from :meth:`embeddings` to feed ``search.identify(threshold=...)``.
    """
    ids = np.asarray(identity_ids, np.int64)
    own = self.identity_thresholds()
    out = np.full(ids.shape, default, np.float32)
    if own and ids.size:
      keys = np.fromiter(own.keys(), np.int64, len(own))
      vals = np.fromiter(own.values(), np.float64, len(own)).astype(np.float32)
      order = np.argsort(keys)
      keys, vals = keys[order], vals[order]
      pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
      hit = keys[pos] == ids
      out[hit] = vals[pos[hit]]
    return out

  def identities(self) -> list[dict]:
    """[{id, name, created, num_embeddings, threshold}] ordered by id."""
    rows = self._db.execute(
        "SELECT i.id, i.name, i.created, COUNT(e.id), i.threshold FROM identities i "
        "LEFT JOIN embeddings e ON e.identity_id = i.id GROUP BY i.id ORDER BY i.id")
    return [{"id": int(r[0]), "name": r[1], "created": r[2], "num_embeddings": int(r[3]),
             "threshold": r[4]} for r in rows]

  def names(self) -> dict[int, str]:
    """{identity id: name}."""
    return {int(i): n for i, n in self._db.execute("SELECT id, name FROM identities")}

  def embeddings(self, identity: str | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All embeddings (or ``identity``'s): ([M, D] float32, [M] int64 identity ids), by row id."""
    if identity is None:
      cursor = self._db.execute("SELECT identity_id, vector FROM embeddings ORDER BY id")
    else:
      cursor = self._db.execute("SELECT identity_id, vector FROM embeddings WHERE identity_id = ? "
                                "ORDER BY id", (self._identity_id(identity),))
    rows = cursor.fetchall()
    dim = self.dim or 0
    if not rows:
      return np.zeros((0, dim), np.float32), np.zeros((0,), np.int64)
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    blobs = [r[1] for r in rows]
    bad = [i for i, b in enumerate(blobs) if not isinstance(b, bytes) or len(b) != 4 * dim]
    if bad:
      raise GalleryError(f"gallery {self.path}: {len(bad)} stored embedding(s) are not {dim} float32 "
                         f"values (first bad row {bad[0]}); the file is damaged")
    emb = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(rows), dim).astype(np.float32)
    return emb, ids

  def sources(self, identity: str | int | None = None) -> list[dict]:
    """[{embedding_id, identity_id, path, sha256, box, created}] by embedding id."""
    query = ("SELECT id, identity_id, source_path, source_sha256, box, created FROM embeddings")
    args: tuple = ()
    if identity is not None:
      query += " WHERE identity_id = ?"
      args = (self._identity_id(identity),)
    rows = self._db.execute(query + " ORDER BY id", args)
    return [{"embedding_id": int(r[0]), "identity_id": int(r[1]), "path": r[2], "sha256": r[3],
             "box": None if r[4] is None else json.loads(r[4]), "created": r[5]} for r in rows]

  # -------------------------------------------------------------- lifetime

  def close(self) -> None:
    self._db.close()

  def __enter__(self) -> "Gallery":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
