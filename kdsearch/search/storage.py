"""The search's Optuna study on disk, where Optuna's own tools look: runs/<name>/search/optuna-journal.log.

    optuna.load_study(storage=journal_storage(path), study_name=STUDY_NAME)    # or `kdsearch dashboard RUN_DIR`

Why a journal: Optuna's JournalFileBackend is one append-only file of JSON lines, written under a file lock,
with no SQLite locking; a SIGKILL can at worst leave a torn last line, which readers skip.

The searcher's study lives in this storage (there is no second, in-memory copy), so the study that samples
is the study on disk. What makes it agree with Tune after a crash is `SnapshotJournal`:
* it buffers the study's writes in memory and appends them in one batch (one lock, one fsync) at most every
  `flush_s` (0.25 s: what a dashboard lags) and whenever Tune snapshots the searcher (`BudgetSearch.save`
  calls `flush` and records the file size then: the snapshot's mark);
* a restored searcher cuts the file back to the mark of the snapshot it was restored from before it reads
  the study. Tune restores its trials from that same snapshot, so the study then holds exactly the trials
  the restored experiment knows: a trial running at the SIGKILL is RUNNING in both and is told once, when
  Tune's resumed run of it ends; samples drawn after the snapshot are gone from both and are drawn again
  (the restored sampler state draws the same configurations, whose trial records are then reused).
Buffering is also what makes a study operation cheap: Optuna's file backend locks, writes and fsyncs the file
for every operation (~0.4 ms here), and one trial of a 24-layer space is ~30 operations.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

STUDY_NAME = "kdsearch"  # one study per journal file
JOURNAL = "optuna-journal.log"  # in the search directory (runs/<name>/search/)


def journal_path(search_dir: str | Path) -> Path:
    return Path(search_dir) / JOURNAL


def journal_storage(path: str | Path) -> JournalStorage:
    """A storage on the journal file for readers (`optuna.load_study`, optuna-dashboard): Optuna's own backend,
    with its default lock, the one `optuna-dashboard FILE` would use too."""
    return JournalStorage(JournalFileBackend(str(path)))


def remove_journal(path: str | Path) -> bool:
    """Delete a journal file (and a lock a killed writer left); True when there was one."""
    p = Path(path)
    existed = p.is_file()
    for f in (p, p.with_name(p.name + ".lock")):
        f.unlink(missing_ok=True)
    return existed


def _count_lines(path: str) -> int:
    """Complete (newline-terminated) lines: the logs Optuna's file backend yields; a torn last line is not one."""
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n


class SnapshotJournal(BaseJournalBackend):
    """A journal file backend whose writes reach the file only at `flush` (see the module doc).

    Single writer: the search driver. Readers in other processes (dashboard, `load_study`) see the study as of
    the last flush. Pickling flushes first, so a pickled study never refers to logs that are not on disk.
    """

    def __init__(self, path: str | Path, flush_s: float = 0.25) -> None:
        self.path = str(path)
        self.flush_s = float(flush_s)
        self._open()

    def _open(self) -> None:
        self._file = JournalFileBackend(self.path)  # creates the file when missing
        self._pending: list[dict[str, Any]] = []
        self._on_file: int | None = None  # logs in the file, counted on first use
        self._flushed_at = time.monotonic()

    def _file_logs(self) -> int:
        if self._on_file is None:
            self._on_file = _count_lines(self.path)
        return self._on_file

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        on_file = self._file_logs()
        if log_number_from < on_file:
            yield from itertools.islice(self._file.read_logs(log_number_from), on_file - log_number_from)
        yield from self._pending[max(0, log_number_from - on_file):]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._pending.extend(logs)
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Append the buffered logs to the file (one lock and fsync); return the file size: the mark."""
        if self._pending:
            on_file = self._file_logs()
            self._file.append_logs(self._pending)
            self._on_file = on_file + len(self._pending)
            self._pending = []
        self._flushed_at = time.monotonic()
        return os.path.getsize(self.path)

    def truncate(self, mark: int) -> int:
        """Cut the file back to `mark` bytes (a snapshot's size) and forget any buffered logs; return the bytes
        dropped. A file shorter than the mark is not the journal that snapshot was taken with: an error."""
        size = os.path.getsize(self.path)
        if size < mark:
            raise RuntimeError(f"{self.path} holds {size} bytes, fewer than the {mark} the search snapshot was "
                               "taken with; the journal was replaced or cut, so the study cannot be restored")
        if size > mark:
            with open(self.path, "r+b") as f:
                f.truncate(mark)
                f.flush()
                os.fsync(f.fileno())
        self._open()
        return size - mark

    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        return {"path": self.path, "flush_s": self.flush_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.flush_s = state["path"], state["flush_s"]
        self._open()


def reopen(storage: JournalStorage) -> None:
    """Make `storage` forget what it has read and replay its backend from the start on next use.

    Uses JournalStorage's own pickling contract (an unpickled JournalStorage starts with an empty replay and
    reads its backend lazily), so a study object and the trials that point at it keep working.
    """
    storage.__setstate__(storage.__getstate__())
