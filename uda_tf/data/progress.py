"""A plain-text progress bar on stderr (no dependency): redrawn in place on a terminal, one line
every few seconds otherwise (log files, CI)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "prepare", *, stream=None, enabled: bool = True,
                 interval_s: float = 5.0):
        self.total, self.label, self.done = int(total), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        finished = self.done >= self.total
        if not self.enabled or not (self.tty or finished or now - self._last >= self.interval_s):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        line = (f"{self.label} [{bar}] {self.done}/{self.total} cases {rate:.2f}/s "
                f"ETA {eta_text} {note}")
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(100))
            if finished:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
