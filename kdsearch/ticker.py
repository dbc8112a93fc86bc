"""A background thread that polls while a stage runs in the foreground (estimates, waiting requests)."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("kdsearch.ticker")


class Ticker:
    """Calls `poll()` every `interval_s` seconds from a daemon thread while a stage runs in the foreground:

        with PendingWatch(requests):  # or EtaReporter(run_dir, stage)
            stage_fn(spec, ctx)

    A view or a watch must never take the stage down: an error in `poll` is logged at debug level."""

    interval_s: float = 10.0

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self.poll()
            except Exception as err:
                log.debug("%s: %s: %s", type(self).__name__, type(err).__name__, err)

    def __enter__(self) -> "Ticker":
        self._halt = threading.Event()
        self._ticker = threading.Thread(target=self._loop, name=f"kdsearch-{type(self).__name__}", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._halt.set()
        self._ticker.join(timeout=5)
