"""The edit journal: SQLite (WAL) for metadata, one safetensors file per edit for its payload.

Commit order for an edit: write the payload file and fsync it, insert the row as `pending`,
apply, mark `applied` (bumping the model version in the same transaction). A crash before the
last step leaves a `pending` row, which the next start resolves as never applied. So every edit
a client was told about survives, and no half edit does.

A rebased edit's new payload never overwrites the old file: it is written under a new name
(`stage_payload`), then every rebased row's file name and digest switch in one transaction
(`switch_payloads`), and only then is the old file deleted. A crash at any point leaves each row
naming a complete file with its digest; the start-up `sweep` removes the file no row names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editserve.faults import crash_point

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    method TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,            -- the request as JSON (requests, hparams): enough to recompute
    status TEXT NOT NULL CHECK (status IN ('pending', 'applied', 'undone', 'failed')),
    payload_sha256 TEXT NOT NULL,
    payload_name TEXT,             -- its payload file in edits/; NULL: "<id>.safetensors"
    created_at REAL NOT NULL,
    applied_at REAL,
    undone_at REAL,
    applied_version INTEGER,
    summary TEXT                   -- the checks and timings reported to the client, as JSON
);
"""


class JournalMismatch(RuntimeError):
    """The journal was written for other base weights."""


class CorruptPayload(RuntimeError):
    pass


@dataclass(frozen=True)
class StagedPayload:
    """A rebased edit's new payload, durable under a name of its own, not yet the row's."""

    edit_id: str
    name: str
    digest: str


# Staged payloads are named "<id><marker><random>.safetensors": a start that sweeps one away
# knows a rebase was cut short (EditService.replay).
STAGED_MARKER = ".rebase-"


@dataclass
class EditRow:
    seq: int
    id: str
    method: str
    kind: str
    spec: dict[str, Any]
    status: str
    created_at: float
    applied_at: float | None
    undone_at: float | None
    applied_version: int | None
    summary: dict[str, Any] | None


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.payload_dir = state_dir / "edits"
        self.payload_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            state_dir / "journal.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(edits)")}
        if "payload_name" not in columns:  # a journal written before rebases renamed payloads
            self._db.execute("ALTER TABLE edits ADD COLUMN payload_name TEXT")
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """All-or-nothing, and one thread at a time (the engine thread commits edits too)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- identity and version --------------------------------------------------------------------

    def bind(self, fingerprint: str) -> None:
        """Ties the journal to a base model; refuses a journal written for another one."""
        stored = self._meta("base_fingerprint")
        if stored is None:
            with self._transaction():
                self._set_meta("base_fingerprint", fingerprint)
        elif stored != fingerprint:
            raise JournalMismatch(
                f"the edit journal in {self.state_dir} belongs to another base model "
                f"(fingerprint {stored[:12]}, this model {fingerprint[:12]}); point "
                "EDITSERVE_STATE_DIR at another folder, or move this one away to start afresh"
            )

    @property
    def version(self) -> int:
        return int(self._meta("version") or 0)

    # -- writing -------------------------------------------------------------------------------

    def begin(
        self, edit_id: str, method: str, kind: str, spec: dict, payload: dict[str, torch.Tensor]
    ) -> None:
        """Writes the payload durably, then the row as pending. On failure (a full or read-only
        folder) it leaves nothing behind and raises OSError or sqlite3.Error."""
        path = self.payload_path(edit_id)
        digest = write_payload(path, payload)
        crash_point("after_payload")
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO edits (id, method, kind, spec, status, payload_sha256, created_at)"
                    " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                    (edit_id, method, kind, json.dumps(spec), digest, time.time()),
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def mark_applied(self, edit_id: str) -> int:
        """Commits the edit; returns the new model version."""
        with self._transaction():
            version = self._next_version()
            self._db.execute(
                "UPDATE edits SET status='applied', applied_at=?, applied_version=? "
                "WHERE id=? AND status='pending'",
                (time.time(), version, edit_id),
            )
        return version

    def set_summary(self, edit_id: str, summary: dict) -> None:
        """The checks and timings reported when the edit was made, kept for GET /edits/{id}."""
        with self._transaction():
            self._db.execute(
                "UPDATE edits SET summary=? WHERE id=?", (json.dumps(summary), edit_id)
            )

    def bump_version(self) -> int:
        """A weight change that is not an edit's own commit (a rebased edit re-applied)."""
        with self._transaction():
            return self._next_version()

    def _next_version(self) -> int:
        version = self.version + 1
        self._set_meta("version", str(version))
        return version

    def mark_failed(self, edit_id: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE edits SET status='failed' WHERE id=? AND status='pending'", (edit_id,)
            )
        self.payload_path(edit_id).unlink(missing_ok=True)

    def mark_undone(self, edit_id: str) -> int:
        with self._transaction():
            version = self._next_version()
            self._db.execute(
                "UPDATE edits SET status='undone', undone_at=? WHERE id=? AND status='applied'",
                (time.time(), edit_id),
            )
        return version

    def stage_payload(self, edit_id: str, payload: dict[str, torch.Tensor]) -> StagedPayload:
        """Writes a rebased edit's new payload durably under a new name; the row still names
        (and replay still loads) the old one until `switch_payloads`."""
        name = f"{edit_id}{STAGED_MARKER}{uuid.uuid4().hex[:8]}.safetensors"
        return StagedPayload(edit_id, name, write_payload(self.payload_dir / name, payload))

    def switch_payloads(self, staged: list[StagedPayload]) -> None:
        """Points every staged edit's row at its new file and digest, all in one transaction
        (all switch or none do), then deletes the files they replace."""
        with self._transaction():
            old = []
            for new in staged:
                row = self._db.execute(
                    "SELECT payload_name FROM edits WHERE id=? AND status='applied'",
                    (new.edit_id,),
                ).fetchone()
                if row is None:
                    raise ValueError(f"edit {new.edit_id} is not applied: its payload stays")
                old.append(self.payload_dir / (row[0] or _default_name(new.edit_id)))
                self._db.execute(
                    "UPDATE edits SET payload_name=?, payload_sha256=? WHERE id=?",
                    (new.name, new.digest, new.edit_id),
                )
        crash_point("after_rebase_switch")
        for path in old:  # no row names them now; one left here is swept at the next start
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete %s, a replaced payload: %s", path, exc)

    def discard(self, staged: list[StagedPayload]) -> None:
        """Deletes staged payloads that were never switched in (a rebase that failed)."""
        for new in staged:
            try:
                (self.payload_dir / new.name).unlink(missing_ok=True)
            except OSError as exc:  # swept at the next start
                log.warning("could not delete %s, an unused payload: %s", new.name, exc)

    # -- reading -------------------------------------------------------------------------------

    def get(self, edit_id: str) -> EditRow | None:
        rows = self._rows("WHERE id=?", (edit_id,))
        return rows[0] if rows else None

    def list(self, statuses: tuple[str, ...] = ("applied", "undone")) -> list[EditRow]:
        marks = ",".join("?" * len(statuses))
        return self._rows(f"WHERE status IN ({marks})", statuses)

    def pending(self) -> list[EditRow]:
        return self._rows("WHERE status='pending'", ())

    def sweep(self) -> list[str]:
        """Deletes payload files no live row names: leftovers of a crash between writing a
        payload and inserting its row, or mid-write staging files. Returns their names."""
        with self._lock:
            keep = {
                name or _default_name(edit_id)
                for (edit_id, name) in self._db.execute(
                    "SELECT id, payload_name FROM edits "
                    "WHERE status IN ('pending', 'applied', 'undone')"
                )
            }
        removed = []
        for path in self.payload_dir.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink()
                removed.append(path.name)
        return removed

    def load_payload(self, edit_id: str) -> dict[str, torch.Tensor]:
        with self._lock:  # the name and its digest, read together
            (expected, name) = self._db.execute(
                "SELECT payload_sha256, payload_name FROM edits WHERE id=?", (edit_id,)
            ).fetchone()
        path = self.payload_dir / (name or _default_name(edit_id))
        if not path.is_file():
            raise CorruptPayload(f"the payload of edit {edit_id} is missing ({path})")
        if _sha256(path) != expected:
            raise CorruptPayload(f"the payload of edit {edit_id} is damaged ({path})")
        return load_file(path)

    def payload_path(self, edit_id: str) -> Path:
        """The file the edit's row names (a rebase renames it); the default before a row."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload_name FROM edits WHERE id=?", (edit_id,)
            ).fetchone()
        return self.payload_dir / ((row and row[0]) or _default_name(edit_id))

    def _rows(self, where: str, args: tuple) -> list[EditRow]:
        with self._lock:
            return self._select(where, args)

    def _select(self, where: str, args: tuple) -> list[EditRow]:
        cursor = self._db.execute(
            "SELECT seq, id, method, kind, spec, status, created_at, applied_at, undone_at, "
            f"applied_version, summary FROM edits {where} ORDER BY seq",
            args,
        )
        return [_row(*fields) for fields in cursor.fetchall()]

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _default_name(edit_id: str) -> str:
    return f"{edit_id}.safetensors"


def _row(seq, id_, method, kind, spec, status, created, applied, undone, version, summary):  # noqa: ANN001, ANN202
    return EditRow(
        seq,
        id_,
        method,
        kind,
        json.loads(spec),
        status,
        created,
        applied,
        undone,
        version,
        json.loads(summary) if summary else None,
    )


def write_payload(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Writes beside `path`, fsyncs, renames over it, fsyncs the folder; returns the sha256.

    A failed write (ENOSPC, EROFS, ...) removes its staging file and leaves `path` as it was."""
    staging = path.with_suffix(".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging)
        with staging.open("rb") as handle:
            os.fsync(handle.fileno())
        digest = _sha256(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return digest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """Identifies base weights cheaply: names, shapes, dtypes and a strided sample of values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu()
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()
