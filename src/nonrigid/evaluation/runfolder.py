"""The run folder of ``nonrigid bench`` and ``nonrigid score``: what it computes (``run.json``), its SQLite
database, its images and its stage cache, and the rules that make it resumable. Torch-free at import.

    run.json          what the run computes (data, pairs, methods, settings, seeds, model, metrics); a rerun with
                      a different command is refused instead of mixed in
    results.sqlite    tables ``edits`` (one row per edited image), ``jobs`` (one per finished job),
                      ``stage_entries`` (cache entries written by finished jobs), ``meta``
    images/<method>/<setting>/<pair>/seed0_K10_eta0.20.png
    inputs/<pair>.png the preprocessed input every edit of that pair is scored against
    cache/            the stage cache (unless the run was given another folder), so a restarted run reuses
                      finished stages

Crash safety, SIGKILL included: images are written atomically (temporary file, then rename) before the job's
rows, and a job's rows are inserted in one transaction together with its ``jobs`` row, so a job is either wholly
in the database, with all its images on disk, or not at all. A rerun skips the jobs in ``jobs`` and redoes the
others, overwriting their orphan images. Stage cache entries only count once the job that wrote them is committed
(:class:`RunCache`): a job that was killed half-way sees exactly the cache a clean run would have shown it, so
the resumed run ends with the same rows and the same image bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UsageError
from .protocol import PIE_METRIC_NAMES

CONFIG_FILE = "run.json"
DATABASE_FILE = "results.sqlite"
LOCK_FILE = ".lock"
CACHE_FOLDER = "cache"
FORMAT_VERSION = 1

# Columns of ``edits`` that legitimately differ between two runs of the same command (time, cache hits).
VOLATILE_COLUMNS = ("job_seconds", "seconds_per_edit", "timings", "cache", "created_at")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, pair INTEGER NOT NULL, method TEXT NOT NULL, setting TEXT NOT NULL,
    params TEXT NOT NULL, edits INTEGER NOT NULL, seconds REAL, timings TEXT, cache TEXT, record TEXT,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL REFERENCES jobs(job),
    pair INTEGER NOT NULL, image_name TEXT NOT NULL, target_text TEXT NOT NULL, source_prompt TEXT NOT NULL,
    method TEXT NOT NULL, setting TEXT NOT NULL, seed INTEGER NOT NULL, knobs TEXT NOT NULL, params TEXT NOT NULL,
    clip_t REAL, lpips REAL, aesthetic REAL,{PIE_COLUMNS}
    image TEXT NOT NULL UNIQUE, record TEXT NOT NULL,
    job_seconds REAL, seconds_per_edit REAL, timings TEXT, cache TEXT, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_entries (stage TEXT NOT NULL, key TEXT NOT NULL, job TEXT NOT NULL,
    PRIMARY KEY (stage, key));
"""
# Columns added after the first run folders were written (PIE-Bench's metrics and editing type): nullable, added to
# an older database when it is opened for writing; readers take whatever columns a database has.
ADDED_COLUMNS = (*((name, "REAL") for name in PIE_METRIC_NAMES), ("edit_type", "TEXT"))
SCHEMA = SCHEMA.replace("{PIE_COLUMNS}", "".join(f"\n    {name} {kind}," for name, kind in ADDED_COLUMNS))
JSON_COLUMNS = ("knobs", "params", "record", "timings", "cache")


def png_bytes(image: Image.Image) -> bytes:
    """The bytes of ``image`` as the run folder stores it (PNG, Pillow's default settings)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jsonable(value: Any) -> Any:
    """Tuples as lists and dict keys as strings, recursively: what JSON gives back."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


class RunCache:
    """The run's stage cache as the methods see it (``load``/``save`` of a StageCache), showing only entries that
    finished jobs of this run wrote or the current job wrote itself.

    An entry a killed job left behind is ignored (and rewritten), so the job's rerun computes exactly what a clean
    run computes: e.g. stage A of two seeds is one batch, which is not bit-identical to seed 1 alone. The same
    holds for entries other runs wrote into a shared cache folder: only this run's committed entries are read.
    """

    def __init__(self, root: Path, committed: set[tuple[str, str]]):
        self.root = root
        self.committed = committed
        self.pending: set[tuple[str, str]] = set()
        self._store = None

    @property
    def store(self):
        """The StageCache underneath, made on first use (it imports torch; a finished run never needs it)."""
        if self._store is None:
            from ..stages.cache import StageCache

            self._store = StageCache(self.root)
        return self._store

    def path(self, stage: str, key: str) -> Path:
        return self.store.path(stage, key)

    def load(self, stage: str, key: str, device: Any = "cpu"):
        if (stage, key) not in self.committed and (stage, key) not in self.pending:
            return None
        return self.store.load(stage, key, device)

    def save(self, stage: str, key: str, tensors: dict, meta: dict) -> Path:
        path = self.store.save(stage, key, tensors, meta)
        self.pending.add((stage, key))
        return path

    def put(self, stage: str, key: str, data: bytes) -> None:
        """An entry file another process wrote (a worker's, see :mod:`.distributed`), pending like a saved one."""
        from ..stages.cache import write_atomic

        path = self.path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        self.pending.add((stage, key))


class RunFolder:
    """A run folder opened for writing: its database, its cache, and a lock that keeps a second process out.

    ``cache_dir``: where the stage cache lives (default: the folder's own ``cache/``).
    """

    def __init__(self, path: Path, db: sqlite3.Connection, lock: Any, cache_dir: Path | None = None):
        self.path = path
        self.db = db
        self._lock = lock
        committed = {(s, k) for s, k in db.execute("SELECT stage, key FROM stage_entries")}
        self.cache = RunCache(Path(cache_dir) if cache_dir is not None else path / CACHE_FOLDER, committed)

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict[str, Any], command: Sequence[str] = (),
             cache_dir: str | os.PathLike | None = None) -> RunFolder:
        """Create the run folder, or reopen it if ``identity`` is what it was made with; refuse anything else."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{path} is a file; give a folder for the run")
        config = path / CONFIG_FILE
        if config.is_file():
            check_identity(path, identity)
        elif path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()):
            raise UsageError(f"{path} is not empty and holds no {CONFIG_FILE}; choose a new folder for the run")
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        if not config.is_file():
            from ..stages.cache import write_atomic

            document = {"format": FORMAT_VERSION, "config": identity, "command": list(command)}
            write_atomic(config, (json.dumps(document, indent=2) + "\n").encode())
            config.chmod(_file_mode())
        db = connect(path / DATABASE_FILE)
        db.executescript(SCHEMA)
        _add_missing_columns(db)
        _remove_partial_files(path)
        return cls(path, db, lock, Path(cache_dir) if cache_dir is not None else None)

    def done_jobs(self) -> set[str]:
        return {key for (key,) in self.db.execute("SELECT job FROM jobs")}

    def set_meta(self, **values: Any) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, json.dumps(jsonable(v))) for k, v in values.items()])

    def write_image(self, relative: str, image: Image.Image) -> None:
        """A PNG written atomically: the file is whole or absent, never half-written."""
        self.write_file(relative, png_bytes(image))

    def write_file(self, relative: str, data: bytes) -> None:
        """A file of the run folder (an image's PNG bytes) written atomically."""
        from ..stages.cache import write_atomic

        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        path.chmod(_file_mode())  # the temporary file was private; the image is as readable as any other file

    def commit(self, finished: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
        """Jobs' rows and ``jobs`` entries (and the stage entries they wrote) in one transaction."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        pending = sorted(self.cache.pending)
        with self.db:
            for job_row, rows in finished:
                self.db.execute(
                    "INSERT INTO jobs VALUES (:job, :pair, :method, :setting, :params, :edits, :seconds, :timings, "
                    ":cache, :record, :finished_at)", {**_encode(job_row), "finished_at": now},
                )
                for row in rows:
                    row = {**_encode(row), "created_at": now}
                    columns = ", ".join(row)
                    self.db.execute(f"INSERT INTO edits ({columns}) VALUES ({', '.join(':' + c for c in row)})", row)
            job = finished[-1][0]["job"] if finished else ""
            self.db.executemany("INSERT OR REPLACE INTO stage_entries VALUES (?, ?, ?)",
                                [(stage, key, job) for stage, key in pending])
        self.cache.committed.update(pending)
        self.cache.pending.clear()

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()


@contextlib.contextmanager
def opened(path: str | os.PathLike, identity: dict[str, Any], command: Sequence[str] = (),
           cache_dir: str | os.PathLike | None = None) -> Iterator[RunFolder]:
    """:meth:`RunFolder.open` as a context manager that closes the database and releases the lock."""
    run = RunFolder.open(path, identity, command, cache_dir)
    try:
        yield run
    finally:
        run.close()


def check_identity(path: Path, identity: dict[str, Any]) -> None:
    """Refuse to continue a run folder with a command that computes something else, naming what differs."""
    try:
        stored = json.loads((path / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"{path / CONFIG_FILE} is unreadable; choose a new folder for the run") from None
    current = json.loads(json.dumps(identity))
    if stored != current:
        keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        shown = ", ".join(_difference(k, stored.get(k), current.get(k)) for k in keys)
        raise UsageError(f"{path} holds a run of a different command (it differs in: {shown}); rerun the "
                         "original command to resume it, or choose a new folder for the run")


def _difference(key: str, stored: Any, current: Any) -> str:
    """``size (512 in the run, unset now)`` for a value that fits in a few words (a run made before a default
    changed says which value to give); the bare key for lists and tables."""
    simple = (str, int, float, bool, type(None))
    if not (isinstance(stored, simple) and isinstance(current, simple)):
        return key

    def shown(value: Any) -> str:
        return "unset" if value is None else str(value)

    return f"{key} ({shown(stored)} in the run, {shown(current)} now)"


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """An ``edits`` table written before :data:`ADDED_COLUMNS` existed gets them (NULL in its old rows)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(edits)")}
    with db:
        for name, kind in ADDED_COLUMNS:
            if name not in present:
                db.execute(f"ALTER TABLE edits ADD COLUMN {name} {kind}")


def _lock(path: Path) -> Any:
    """An exclusive lock on the run folder, released by the OS even on SIGKILL (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    handle = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"{path} is in use by another nonrigid process; wait for it or choose another folder") \
            from None
    return handle


def _remove_partial_files(path: Path) -> None:
    """Temporary files of writes a killed run left behind (we hold the lock: nobody else is writing here; a cache
    folder elsewhere may be shared, so it is left alone)."""
    for folder in ("images", "inputs", CACHE_FOLDER):
        for tmp in (path / folder).rglob(".*.tmp") if (path / folder).is_dir() else ():
            tmp.unlink(missing_ok=True)


@functools.cache
def _file_mode() -> int:
    """rw for everyone the umask allows: what a plain ``open(..., "w")`` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60)
    db.execute("PRAGMA synchronous=FULL")
    return db


def reader(path: Path) -> sqlite3.Connection:
    """A connection for reading an existing database. Not ``mode=ro``: after a kill mid-commit the first reader
    must roll the leftover journal back, which a read-only connection cannot (sqlite opens read-only files
    read-only by itself)."""
    return sqlite3.connect(path, timeout=60)


def _encode(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(jsonable(v)) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}


def read_rows(run: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a run's ``edits`` table in insertion order, JSON columns decoded."""
    path = Path(run) / DATABASE_FILE
    if not path.is_file():
        raise UsageError(f"{run} holds no {DATABASE_FILE}; give a folder written by `nonrigid bench` or "
                         "`nonrigid score`")
    db = reader(path)
    db.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in db.execute("SELECT * FROM edits ORDER BY id")]
    finally:
        db.close()
    for row in rows:
        for column in JSON_COLUMNS:
            if row.get(column) is not None:
                row[column] = json.loads(row[column])
    return rows


def done_job_keys(run: str | os.PathLike) -> set[str]:
    """The finished jobs of a run folder (none if it holds no database yet), without locking it."""
    path = Path(run) / DATABASE_FILE
    if not path.is_file():
        return set()
    db = reader(path)
    try:
        return {key for (key,) in db.execute("SELECT job FROM jobs")}
    except sqlite3.DatabaseError:  # created but its tables not yet
        return set()
    finally:
        db.close()


def read_config(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / CONFIG_FILE
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"{run} holds no readable {CONFIG_FILE}; give a folder written by `nonrigid bench` or "
                         "`nonrigid score`") from None
