"""`kdsearch dashboard RUN_DIR`: optuna-dashboard on the run's study (the optional extra kdsearch[dashboard]).

optuna-dashboard's command line opens a journal file by path too; its Python API (`run_server(storage)`) is used
here so that the storage is built exactly as the search's readers build it (`storage.journal_storage`). It
reads the journal while the search runs (the search flushes it at every experiment snapshot, ~1 s). Notes
written in the dashboard go into the same journal; after a crash and resume, the ones written after the
restored snapshot are cut with the rest of that snapshot's tail.
"""

from __future__ import annotations

from pathlib import Path

from ..rundir import RunDirError
from .results import search_dir
from .storage import journal_path, journal_storage

INSTALL_HINT = 'the dashboard needs optuna-dashboard: pip install "kdsearch[dashboard]"'


def have_dashboard() -> bool:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return False
    return True


def study_journal(run_dir: Path) -> Path:
    """The run's journal file, or a one-line RunDirError when the run has no search yet."""
    path = journal_path(search_dir(run_dir))
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no Optuna study yet ({path} is missing); run `kdsearch search SPEC` first")
    return path


def serve_dashboard(path: Path, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the study in the journal `path` until Ctrl-C (optuna-dashboard must be importable: `have_dashboard`)."""
    import optuna_dashboard

    print(f"kdsearch: optuna-dashboard on {path} at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        optuna_dashboard.run_server(journal_storage(path), host=host, port=port)
    except KeyboardInterrupt:
        pass
