"""The enrolled-faces gallery, persisted in one SQLite file (standard library only).

A :class:`Gallery` holds who is enrolled (identities and their face embeddings),
the thresholds fitted for them and how they were fitted, and a background cohort
(faces of people who are not enrolled, for S-norm score normalisation). Changes
are atomic and durable; embeddings of two encoders never mix (the encoder
fingerprint is checked). :func:`writable_problem` says why a gallery cannot be
written.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sqlite3
import tempfile
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["Gallery", "GalleryError", "SCHEMA_VERSION", "normalize_name", "writable_problem"]

SCHEMA_VERSION = 2

# SQLite primary result codes (extended codes carry them in the low byte).
(_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_CANTOPEN,
 _SQLITE_NOTADB) = 5, 6, 8, 11, 14, 26

# Schema version 2: schema_version (one row); meta (JSON values: "fingerprint", "dim",
# "threshold", "calibration" = how the threshold was fitted); identities; embeddings
# (ON DELETE CASCADE with their identity); cohort (new in version 2). A version-1 file is
# upgraded in one transaction when opened writable, and read as it is (an empty cohort) when
# opened read-only; a newer version is refused. Vectors are raw little-endian float32 bytes
# (``ndarray.tobytes``), read back with ``np.frombuffer`` after a length check (never pickle).
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

# Added by schema version 2 (a version-1 file gets it when opened writable).
_COHORT_SCHEMA = """
CREATE TABLE IF NOT EXISTS cohort (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  vector BLOB NOT NULL,
  source_path TEXT,
  source_sha256 TEXT,
  created TEXT NOT NULL
)
"""

# Characters refused in names: control characters, line and paragraph separators,
# and unpaired surrogates (not text; SQLite cannot store them).
_BAD_NAME_CATEGORIES = {"Cc": "control character", "Zl": "line separator",
                        "Zp": "paragraph separator", "Cs": "unpaired surrogate"}


class GalleryError(ValueError):
  """The gallery cannot do what was asked (wrong encoder, unknown name, bad file, ...)."""


def _now() -> str:
  return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _canonical(fingerprint: dict) -> str:
  try:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
  except (TypeError, ValueError) as e:
    raise GalleryError(f"fingerprint: must be a JSON-serializable dict, got {fingerprint!r} ({e})") from e


def normalize_name(name: str, what: str = "name") -> str:
  """Checks an identity name and returns it in Unicode NFC, the form the gallery stores.

  "Zoë" typed precomposed (U+00EB) or decomposed (e + U+0308) gives the same
  string, so both spellings are one identity. Every gallery method that takes
  a name calls this; call it up front to refuse a bad name before doing work.

  Raises:
    GalleryError: ``name`` is not a string, is empty or only whitespace, has
      leading or trailing whitespace, or contains a control character
      (newline, tab, NUL, ...), a line or paragraph separator (U+2028, U+2029)
      or an unpaired surrogate. The message shows ``repr(name)``.
  """
  if not isinstance(name, str):
    raise GalleryError(f"{what}: expected a non-empty string, got {name!r}")
  for c in name:
    kind = _BAD_NAME_CATEGORIES.get(unicodedata.category(c))
    if kind is not None:
      raise GalleryError(f"{what} {name!r}: contains a {kind} ({c!r}, U+{ord(c):04X}); "
                         f"names must be one line of printable text")
  name = unicodedata.normalize("NFC", name)
  if not name.strip():
    raise GalleryError(f"{what}: expected a non-empty string, got {name!r}")
  if name != name.strip():
    raise GalleryError(f"{what}: {name!r} has leading or trailing whitespace")
  return name


def _os_problem(e: OSError, where: str, what: str, hint: str = "") -> str:
  if e.errno == errno.EROFS:
    return f"{where} is on a read-only file system"
  reason = e.strerror or str(e)
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"{what} ({reason}){hint}"
  return f"{where}: {reason}{hint}"


def writable_problem(path: str) -> str | None:
  """Why the gallery file ``path`` cannot be written, or None when it can.

  Tries it instead of asking ``os.access`` (which says yes to root even for an
  immutable file or folder): opens the existing file, and its ``-wal`` and
  ``-shm`` companions when present, with 'r+b' (no truncation, nothing
  written), and creates and deletes a temporary file in its folder, where
  SQLite writes its journal. An absent file is writable when its folder is.

  Returns:
    None, or a reason such as "the file is read-only (Permission denied)",
    "folder F is not writable (...); SQLite writes its journal beside the
    file" or "... is on a read-only file system".
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  for p, what in ((path, "the file"), (path + "-wal", f"its journal {path}-wal"),
                  (path + "-shm", f"its WAL index {path}-shm")):
    try:
      with open(p, "r+b"):
        pass
    except FileNotFoundError:
      continue
    except IsADirectoryError:
      return f"{p} is a folder"
    except OSError as e:
      return _os_problem(e, p, f"{what} is read-only")
  if not os.path.isdir(folder):
    return f"folder {folder} does not exist"
  try:
    fd, probe = tempfile.mkstemp(prefix=".jaxface-write-test-", dir=folder)
  except OSError as e:
    return _os_problem(e, f"folder {folder}", f"folder {folder} is not writable",
                       "; SQLite writes its journal beside the file")
  os.close(fd)
  try:
    os.unlink(probe)
  except OSError as e:
    return _os_problem(e, f"folder {folder}", f"folder {folder} does not let files be deleted")
  return None


def _uri(path: str, query: str) -> str:
  # "file://" + an absolute path: an empty authority, so even "//x" stays a path.
  return "file://" + urllib.parse.quote(os.path.abspath(path)) + "?" + query


def _sqlite_code(e: BaseException) -> int | None:
  code = getattr(e, "sqlite_errorcode", None)
  return None if code is None else code & 0xFF


def _open_error(path: str, e: sqlite3.Error) -> GalleryError:
  """An SQLite error met while opening ``path``, told apart by its cause."""
  code = _sqlite_code(e)
  if code == _SQLITE_NOTADB or (code is None and "not a database" in str(e)):
    return GalleryError(f"gallery {path}: not a jaxface gallery (not an SQLite file: {e})")
  if code == _SQLITE_CORRUPT:
    return GalleryError(f"gallery {path}: an SQLite file, but damaged ({e})")
  if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
    return GalleryError(f"gallery {path}: cannot be opened ({e}; another process is writing to it)")
  return GalleryError(f"gallery {path}: cannot be opened ({e})")


def _check_embeddings(embeddings: Any, where: str, allow_empty: bool = False) -> np.ndarray:
  emb = np.asarray(embeddings)
  if emb.ndim == 1:
    raise GalleryError(f"{where}: expected [N, D], got a 1-D array of shape "
                       f"{emb.shape}; use embeddings[None] for one face")
  # allow_empty: [0, D] (or [0, 0]) is fine, [N, 0] never is.
  if emb.ndim != 2 or (not allow_empty and 0 in emb.shape) or (emb.shape[0] and not emb.shape[1]):
    raise GalleryError(f"{where}: expected a non-empty [N, D] array, got shape {emb.shape}")
  if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
    raise GalleryError(f"{where}: expected real numbers, got dtype {emb.dtype}")
  emb = np.ascontiguousarray(emb, dtype="<f4")
  if not np.isfinite(emb).all():
    raise GalleryError(f"{where}: contain NaN or infinite values")
  return emb


def _check_sources(sources: Iterable[dict] | None, n: int, owner: str,
                   keys: tuple[str, ...] = ("path", "sha256", "box")) -> list[tuple]:
  """[(path, sha256, box JSON or None)] for ``n`` embeddings ``owner`` ("for 'alice'")."""
  srcs = [{} for _ in range(n)] if sources is None else list(sources)
  if len(srcs) != n:
    raise GalleryError(f"sources {owner}: {len(srcs)} sources for {n} embeddings")
  rows = []
  for i, s in enumerate(srcs):
    where = f"sources[{i}] {owner}"
    if not isinstance(s, dict) or set(s) - set(keys):
      raise GalleryError(f"{where}: expected a dict with keys {', '.join(keys)}, got {s!r}")
    path, sha = s.get("path"), s.get("sha256")
    if path is not None and not isinstance(path, str):
      raise GalleryError(f"{where}: path must be a string, got {path!r}")
    if sha is not None and not isinstance(sha, str):
      raise GalleryError(f"{where}: sha256 must be a hex string, got {sha!r}")
    rows.append((path, sha, _check_box(s.get("box"), where)))
  return rows


def _check_threshold(value: Any, what: str, kind: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not np.isfinite(value):
    raise GalleryError(f"{what}: expected a finite number, got {value!r}")
  if kind == "distance" and value < 0:
    raise GalleryError(f"{what}: expected a finite number >= 0 (a distance), got {value!r}")
  return float(value)


def _json_default(o: Any) -> Any:
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _check_box(box: Any, where: str) -> str | None:
  if box is None:
    return None
  arr = np.asarray(box)
  if arr.shape != (4,) or not np.issubdtype(arr.dtype, np.integer):
    raise GalleryError(f"{where}: box must be 4 ints (left, top, right, bottom) or None, got {box!r}")
  return json.dumps([int(v) for v in arr])


class Gallery:
  """Enrolled identities and their face embeddings in the SQLite file ``path``.

  The encoder fingerprint (e.g. model name, weights sha256, preprocessing) is a
  JSON object stored on the first enrollment; a gallery opened or enrolled into
  with a different fingerprint raises :class:`GalleryError` naming both, so
  embeddings of two encoders never mix. Identity names are stored in Unicode NFC
  (:func:`normalize_name`), so every spelling of "Zoë" is one identity.

  Every change (enroll, remove, rename, set_threshold(s), set_cohort) runs in its
  own ``BEGIN IMMEDIATE`` transaction in WAL mode with ``synchronous=FULL``: a
  process killed in the middle of a change leaves the file exactly as it was
  before that change (SQLite rolls the unfinished transaction back on the next
  open), and a finished change survives a power cut.

  Args:
    path: the gallery file; created (with its schema) when absent and
      ``create``. Its folder must exist.
    fingerprint: the encoder that made (or will make) the embeddings, a
      JSON-serializable dict. When the gallery already holds one and they
      differ, opening fails. None opens any gallery (listing, removing,
      renaming, searching what is stored), but :meth:`enroll` and
      :meth:`set_cohort` refuse: new embeddings are only accepted with a
      fingerprint to check.
    readonly: open for reading only (``mode=ro``), for a gallery that cannot
      (or must not) be written: a read-only file, folder or file system. In a
      folder it cannot write in, SQLite cannot create the WAL index (``-shm``)
      beside the file, so the file is then opened ``immutable=1``; caveat: such
      a reader does not see changes a concurrent writer makes (nor changes still
      in an un-checkpointed ``-wal`` file).
      Nothing is ever written to the file, a version-1 file is not upgraded,
      and every change method raises :class:`GalleryError`. Implies
      ``create=False``.
    create: create the gallery when the file is absent (or empty). With
      False, an absent file or an empty (0-byte) one is an error and nothing
      is written.

  Attributes:
    path, readonly: as given. immutable: True when opened ``immutable=1``.

  Raises:
    GalleryError: the file cannot be opened (permissions), cannot be written
      (a writer only; see :func:`writable_problem`), does not exist or is
      empty (``create=False`` or ``readonly``), is not a jaxface gallery, was
      written by a newer jaxface, its folder does not exist, or the
      fingerprints differ.
  """

  # Test hook: called inside the enroll and set_cohort transactions after the
  # rows are written and before COMMIT (the killed-process test pauses here).
  _before_commit: Callable[[], None] | None = None

  def __init__(self, path: str, fingerprint: dict | None = None, *, readonly: bool = False,
               create: bool = True):
    self.path = os.fspath(path)
    self.readonly = bool(readonly)
    self.immutable = False
    self._version = SCHEMA_VERSION
    folder = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(folder):
      raise GalleryError(f"gallery {self.path}: folder {folder} does not exist")
    if os.path.isdir(self.path):
      raise GalleryError(f"gallery {self.path}: is a folder, expected a gallery file")
    if fingerprint is not None and not isinstance(fingerprint, dict):
      raise GalleryError(f"fingerprint: expected a dict or None, got {type(fingerprint).__name__}")
    self._wanted = _canonical(fingerprint) if fingerprint is not None else None
    create = create and not self.readonly
    if not os.path.exists(self.path):
      if not create:
        raise GalleryError(f"gallery {self.path}: does not exist")
    else:
      try:
        with open(self.path, "rb") as f:
          empty = not f.read(1)
      except OSError as e:
        raise GalleryError(f"gallery {self.path}: cannot be opened ({e.strerror or e})") from e
      if empty and not create:
        raise GalleryError(f"gallery {self.path}: is empty, not a gallery (0 bytes)")
    if not self.readonly:
      problem = writable_problem(self.path)
      if problem is not None:
        raise GalleryError(f"gallery {self.path}: cannot be written: {problem}")
    self._db = None
    try:
      self._db = self._connect_readonly() if self.readonly else self._connect(create)
      self._setup(create)
    except sqlite3.Error as e:
      self._close_quietly()
      raise _open_error(self.path, e) from e
    except BaseException:
      self._close_quietly()
      raise

  # ------------------------------------------------------------------ setup

  def _connect(self, create: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; each change opens its own.
    return sqlite3.connect(_uri(self.path, "mode=rwc" if create else "mode=rw"), uri=True,
                           isolation_level=None, timeout=30.0)

  def _connect_readonly(self) -> sqlite3.Connection:
    db = sqlite3.connect(_uri(self.path, "mode=ro"), uri=True, isolation_level=None, timeout=30.0)
    try:
      db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
      return db
    except sqlite3.OperationalError as e:
      db.close()
      # CANTOPEN, or READONLY_CANTINIT (EACCES rather than EPERM on the folder).
      if _sqlite_code(e) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY):
        raise
    # The file is readable (checked before), so SQLite could not create the WAL
    # index (-shm) beside it: the folder is not writable. Read the file as it is.
    db = sqlite3.connect(_uri(self.path, "mode=ro&immutable=1"), uri=True, isolation_level=None)
    self.immutable = True
    return db

  def _close_quietly(self) -> None:
    if self._db is not None:
      try:
        self._db.close()
      except sqlite3.Error:
        pass

  def _setup(self, create: bool) -> None:
    db = self._db
    db.execute("PRAGMA foreign_keys = ON")
    # Only reads until the file is known to be a gallery of a version this code
    # writes: a foreign or newer file is left byte-identical.
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = None
    if "schema_version" in tables:
      version = self._stored_version()
    elif tables - {"sqlite_sequence"}:
      raise GalleryError(f"gallery {self.path}: an SQLite file, but not a jaxface gallery "
                         f"(tables {sorted(tables)})")
    elif not create:
      raise GalleryError(f"gallery {self.path}: an SQLite file without tables, not a jaxface gallery")
    if not self.readonly:
      db.execute("PRAGMA journal_mode = WAL")
      db.execute("PRAGMA synchronous = FULL")
      if version is None:
        with self._transaction("create the gallery"):
          # Statement by statement: executescript() would COMMIT the transaction.
          for statement in filter(str.strip, (_SCHEMA + ";" + _COHORT_SCHEMA).split(";")):
            db.execute(statement)
          # Another process may have created the schema while we waited for the lock.
          if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            db.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))
      elif version < SCHEMA_VERSION:
        self._upgrade()
      version = self._stored_version()
    self._version = version
    stored = self._meta("fingerprint")
    if self._wanted is not None and stored is not None and stored != self._wanted:
      raise GalleryError(
          f"gallery {self.path} was built with encoder {stored}, but this encoder is "
          f"{self._wanted}; use the same encoder or a new gallery file")

  def _stored_version(self) -> int:
    row = self._db.execute("SELECT version FROM schema_version").fetchone()
    version = None if row is None else row[0]
    if isinstance(version, int) and version > SCHEMA_VERSION:
      raise GalleryError(f"gallery {self.path}: schema version {version} was written by a newer "
                         f"jaxface (this one reads versions 1 to {SCHEMA_VERSION}); upgrade jaxface")
    if not isinstance(version, int) or version < 1:
      raise GalleryError(f"gallery {self.path}: schema version {version!r} is not a version "
                         f"this jaxface knows (1 to {SCHEMA_VERSION})")
    return version

  def _upgrade(self) -> None:
    """Brings an older schema up to :data:`SCHEMA_VERSION`, in one transaction."""
    with self._transaction("upgrade the gallery") as db:
      version = self._stored_version()  # another process may have upgraded it meanwhile
      if version == 1:
        db.execute(_COHORT_SCHEMA)
        # Names written before they were normalised: NFC, unless that collides.
        for identity_id, name in db.execute("SELECT id, name FROM identities").fetchall():
          nfc = unicodedata.normalize("NFC", name)
          if nfc != name and db.execute("SELECT 1 FROM identities WHERE name = ?",
                                        (nfc,)).fetchone() is None:
            db.execute("UPDATE identities SET name = ? WHERE id = ?", (nfc, identity_id))
        db.execute("UPDATE schema_version SET version = 2")

  class _Tx:
    def __init__(self, gallery: Gallery, action: str):
      self.gallery = gallery
      self.db = gallery._db
      self.action = action

    def __enter__(self):
      try:
        self.db.execute("BEGIN IMMEDIATE")
      except sqlite3.OperationalError as e:
        if _sqlite_code(e) in (_SQLITE_BUSY, _SQLITE_LOCKED):  # another process holds the lock
          raise GalleryError(f"gallery {self.gallery.path}: cannot start a change ({e}); another "
                             f"process is writing to it") from e
        raise self.gallery._write_error(self.action, e) from e
      return self.db

    def _rollback(self) -> None:
      if self.db.in_transaction:  # SQLite rolls back by itself after some errors (disk full)
        try:
          self.db.execute("ROLLBACK")
        except sqlite3.Error:
          pass  # the connection is unusable; SQLite rolls back on the next open

    def __exit__(self, exc_type, exc, tb):
      if exc_type is None:
        try:
          self.db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
          self._rollback()
          raise self.gallery._write_error(self.action, e) from e
        return False
      self._rollback()
      if issubclass(exc_type, sqlite3.DatabaseError) and not issubclass(exc_type, sqlite3.ProgrammingError):
        raise self.gallery._write_error(self.action, exc) from exc
      return False

  def _transaction(self, action: str) -> _Tx:
    self._check_writable(action)
    return Gallery._Tx(self, action)

  def _check_writable(self, action: str) -> None:
    if self.readonly:
      problem = writable_problem(self.path)
      raise GalleryError(f"gallery {self.path} is open read-only: cannot {action}"
                         + (f" ({problem})" if problem else ""))

  def _write_error(self, action: str, e: BaseException) -> GalleryError:
    problem = writable_problem(self.path)
    return GalleryError(f"gallery {self.path}: cannot {action} ({e})"
                        + (f": {problem}" if problem else ""))

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
      found = self._find_name(normalize_name(identity, what))
      row = None if found is None else (found,)
    if row is None:
      known = self.num_identities()
      raise GalleryError(f"{what} {identity!r} is not enrolled in gallery {self.path} "
                         f"({known} identities enrolled)")
    return int(row[0])

  def _find_name(self, name: str) -> int | None:
    """The id of the identity called ``name`` (already NFC), or None."""
    row = self._db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
    if row is not None:
      return int(row[0])
    if self._version < 2:  # read-only version 1: names may be stored in another normal form
      for identity_id, stored in self._db.execute("SELECT id, name FROM identities"):
        if unicodedata.normalize("NFC", stored) == name:
          return int(identity_id)
    return None

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
      name: identity name (see :func:`normalize_name`; stored in NFC).
      embeddings: [N, D] float32 (N >= 1; other real dtypes are converted),
        all finite; D must equal the gallery's dimension once set.
      sources: N dicts with optional keys ``path`` (str), ``sha256`` (hex str)
        and ``box`` (4 ints l, t, r, b); None for no source information.

    Returns:
      The identity id.

    Raises:
      GalleryError: the gallery is read-only or was opened without a
        fingerprint, a bad name (see :func:`normalize_name`), a dimension
        mismatch, bad embeddings or sources.
    """
    self._check_writable(f"enroll {name!r}")
    name = normalize_name(name)
    emb = _check_embeddings(embeddings, f"embeddings for {name!r}")
    n, dim = emb.shape
    rows_meta = _check_sources(sources, n, f"for {name!r}")
    created = _now()
    with self._transaction(f"enroll {name!r}") as db:
      self._claim_encoder(dim, f"embeddings for {name!r}", "enrolling")
      found = self._find_name(name)
      if found is None:
        identity_id = int(db.execute("INSERT INTO identities(name, created) VALUES (?, ?)",
                                     (name, created)).lastrowid)
      else:
        identity_id = found
      db.executemany(
          "INSERT INTO embeddings(identity_id, vector, source_path, source_sha256, box, created) "
          "VALUES (?, ?, ?, ?, ?, ?)",
          ((identity_id, emb[i].tobytes(), *rows_meta[i], created) for i in range(n)))
      if Gallery._before_commit is not None:
        Gallery._before_commit()
    return identity_id

  def _claim_encoder(self, dim: int, where: str, doing: str) -> None:
    """Inside a change: checks (or, the first time, stores) the fingerprint and dimension."""
    if self._wanted is None:
      raise GalleryError(f"gallery {self.path}: {doing} needs the encoder fingerprint, to "
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
      raise GalleryError(f"{where}: {dim} dimensions, the gallery {self.path} "
                         f"holds {stored_dim}-dimensional embeddings")

  def remove(self, name: str) -> int:
    """Removes identity ``name`` (or id) and all its embeddings; returns how many embeddings went."""
    with self._transaction(f"remove {name!r}") as db:
      identity_id = self._identity_id(name)
      count = db.execute("SELECT COUNT(*) FROM embeddings WHERE identity_id = ?",
                         (identity_id,)).fetchone()[0]
      db.execute("DELETE FROM identities WHERE id = ?", (identity_id,))  # cascades
    return int(count)

  def rename(self, old: str, new: str) -> None:
    """Renames identity ``old`` (name or id) to ``new``, which must not name another
    identity, in any Unicode spelling (both names are compared in NFC)."""
    self._check_writable(f"rename {old!r}")
    new = normalize_name(new, "new name")
    with self._transaction(f"rename {old!r}") as db:
      identity_id = self._identity_id(old)
      other = self._find_name(new)
      if other is not None and other != identity_id:
        raise GalleryError(f"cannot rename {old!r} to {new!r}: {new!r} is already enrolled "
                           f"in gallery {self.path}")
      db.execute("UPDATE identities SET name = ? WHERE id = ?", (new, identity_id))

  def set_threshold(self, value: float | None, *, identity: str | int | None = None) -> None:
    """Stores the global threshold (or ``identity``'s own; None clears it).

    The stored calibration info (and so :meth:`score_kind`) is kept. For the
    "distance" score kind thresholds are Euclidean distances (same person when
    distance <= threshold) and must be >= 0.
    """
    self._check_writable("set a threshold")
    with self._transaction("set a threshold") as db:
      if value is not None:
        value = _check_threshold(value, "threshold", self.score_kind())
      if identity is None:
        if value is None:
          db.execute("DELETE FROM meta WHERE key = 'threshold'")
        else:
          self._set_meta("threshold", json.dumps(value))
      else:
        identity_id = self._identity_id(identity)
        db.execute("UPDATE identities SET threshold = ? WHERE id = ?", (value, identity_id))

  def set_thresholds(self, value: float, per_identity: dict | None = None, *,
                     info: dict | None = None, cohort: Any = None,
                     cohort_sources: Iterable[dict] | None = None) -> None:
    """Replaces all thresholds in one transaction: the global ``value``, and
    per-identity ones (``{identity id or name: threshold}``); every identity
    not in ``per_identity`` loses its own threshold, since it was fitted
    around the old global one. A killed process leaves the old set intact.

    Args:
      value, per_identity: finite numbers; >= 0 when the score kind is
        "distance" (S-norm thresholds are usually negative).
      info: how the thresholds were fitted, a JSON-serializable dict stored
        as :meth:`calibration` in the same transaction (None clears it), e.g.
        ``{"score": "distance" | "snorm", "method": "far" | "fpir" | "best",
        "target": 0.01, "gallery_size": 25, "pairs": 1200}``. Its "score"
        (default "distance") is the :meth:`score_kind` the thresholds apply to.
      cohort, cohort_sources: when ``cohort`` is given, the background cohort
        is replaced in the same transaction (as :meth:`set_cohort`), so
        S-norm thresholds and the cohort they were fitted with change together.
    """
    self._check_writable("set thresholds")
    new_cohort = None
    if cohort is not None:
      new_cohort = _check_embeddings(cohort, "cohort embeddings", allow_empty=True)
      cohort_meta = _check_sources(cohort_sources, new_cohort.shape[0], "for the cohort",
                                   keys=("path", "sha256"))
    kind, info_json = "distance", None
    if info is not None:
      if not isinstance(info, dict):
        raise GalleryError(f"calibration info: expected a dict or None, got {info!r}")
      kind = info.get("score", "distance")
      if not isinstance(kind, str) or not kind:
        raise GalleryError(f"calibration info: 'score' must be a non-empty string such as "
                           f"'distance' or 'snorm', got {kind!r}")
      try:
        info_json = json.dumps(info, sort_keys=True, allow_nan=False, default=_json_default)
      except (TypeError, ValueError) as e:
        raise GalleryError(f"calibration info: must be a JSON-serializable dict, got {info!r} "
                           f"({e})") from e
    value = _check_threshold(value, "threshold", kind)
    per_identity = {k: _check_threshold(v, f"threshold of {k!r}", kind)
                    for k, v in (per_identity or {}).items()}
    with self._transaction("set thresholds") as db:
      self._set_meta("threshold", json.dumps(value))
      if info_json is None:
        db.execute("DELETE FROM meta WHERE key = 'calibration'")
      else:
        self._set_meta("calibration", info_json)
      db.execute("UPDATE identities SET threshold = NULL")
      for identity, v in per_identity.items():
        db.execute("UPDATE identities SET threshold = ? WHERE id = ?",
                   (v, self._identity_id(identity)))
      if new_cohort is not None:
        self._replace_cohort(db, new_cohort, cohort_meta)
      if kind == "snorm" and db.execute("SELECT COUNT(*) FROM cohort").fetchone()[0] < 2:
        raise GalleryError(f"gallery {self.path}: S-norm thresholds need a background cohort of "
                           ">= 2 faces (pass cohort=...)")

  def set_cohort(self, embeddings: Any, sources: Iterable[dict] | None = None) -> int:
    """Replaces the whole background cohort, in one transaction.

    The cohort is faces of people who are not enrolled, for S-norm score
    normalisation; the same encoder checks as :meth:`enroll` apply.

    Args:
      embeddings: [C, D] float32 (other real dtypes are converted), finite;
        D must equal the gallery's dimension once set (the first embeddings
        stored set it, and the fingerprint). C = 0 empties the cohort.
      sources: C dicts with optional keys ``path`` (str) and ``sha256``
        (hex str); None for no source information.

    Returns:
      C, the number of cohort embeddings now stored.
    """
    self._check_writable("set the cohort")
    emb = _check_embeddings(embeddings, "cohort embeddings", allow_empty=True)
    n = emb.shape[0]
    rows_meta = _check_sources(sources, n, "for the cohort", keys=("path", "sha256"))
    with self._transaction("set the cohort") as db:
      self._replace_cohort(db, emb, rows_meta)
      if Gallery._before_commit is not None:
        Gallery._before_commit()
    return n

  def _replace_cohort(self, db: sqlite3.Connection, emb: np.ndarray, rows_meta: list) -> None:
    """Inside a transaction: the cohort becomes ``emb`` [C, D] (checked) with its sources."""
    n, dim = emb.shape
    if n:
      self._claim_encoder(dim, "cohort embeddings", "setting the cohort")
    created = _now()
    db.execute("DELETE FROM cohort")
    db.executemany(
        "INSERT INTO cohort(vector, source_path, source_sha256, created) VALUES (?, ?, ?, ?)",
        ((emb[i].tobytes(), rows_meta[i][0], rows_meta[i][1], created) for i in range(n)))

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
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return self._decode([r[1] for r in rows], "embedding"), ids

  def _decode(self, blobs: list, what: str) -> np.ndarray:
    """Stored vectors as [M, D] float32, after checking every length."""
    dim = self.dim or 0
    if not blobs:
      return np.zeros((0, dim), np.float32)
    bad = [i for i, b in enumerate(blobs) if not isinstance(b, bytes) or len(b) != 4 * dim]
    if bad:
      raise GalleryError(f"gallery {self.path}: {len(bad)} stored {what}(s) are not {dim} float32 "
                         f"values (first bad row {bad[0]}); the file is damaged")
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)

  def calibration(self) -> dict | None:
    """How the thresholds were fitted (the ``info`` given to :meth:`set_thresholds`), or None."""
    stored = self._meta("calibration")
    return None if stored is None else json.loads(stored)

  def score_kind(self) -> str:
    """The score the thresholds apply to: the calibration's "score", else "distance"."""
    info = self.calibration()
    kind = info.get("score") if isinstance(info, dict) else None
    return kind if isinstance(kind, str) and kind else "distance"

  def cohort(self) -> np.ndarray:
    """The background cohort, [C, D] float32 by row id (``zeros((0, dim))`` when none)."""
    if self._version < 2:  # a version-1 file opened read-only has no cohort table
      return self._decode([], "cohort embedding")
    rows = self._db.execute("SELECT vector FROM cohort ORDER BY id").fetchall()
    return self._decode([r[0] for r in rows], "cohort embedding")

  def cohort_size(self) -> int:
    """Number of cohort embeddings."""
    if self._version < 2:
      return 0
    return int(self._db.execute("SELECT COUNT(*) FROM cohort").fetchone()[0])

  def cohort_sources(self) -> list[dict]:
    """[{cohort_id, path, sha256, created}] for the cohort rows, by row id."""
    if self._version < 2:
      return []
    rows = self._db.execute("SELECT id, source_path, source_sha256, created FROM cohort ORDER BY id")
    return [{"cohort_id": int(r[0]), "path": r[1], "sha256": r[2], "created": r[3]} for r in rows]

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

  def __enter__(self) -> Gallery:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
