"""Progress line on stderr (docs/s, tokens/s, ETA from bytes read), only on a TTY."""

from __future__ import annotations

import sys
import time


class Progress:
    """Rewrites one stderr line every ``log_interval`` documents.

    Args:
        total_bytes: input size on disk (compressed size for ``.gz``), for the ETA.
        log_interval: documents between updates.
        enabled: False for ``--quiet``; output is also off when stderr is not a terminal.
    """

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total_bytes = total_bytes
        self.log_interval = log_interval
        self.read_bytes = 0
        self._start = time.perf_counter()
        self._next = log_interval
        self._shown = False

    def update(self, num_documents: int, num_tokens: int) -> None:
        """Reports counts so far; prints when ``log_interval`` more documents are done."""
        if not self.enabled or num_documents < self._next:
            return
        self._next = num_documents + self.log_interval
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        line = (
            f"\r{num_documents:,} docs  {num_documents / elapsed:,.0f} docs/s  "
            f"{num_tokens / elapsed:,.0f} tokens/s"
        )
        if self.total_bytes and 0 < self.read_bytes <= self.total_bytes:
            fraction = self.read_bytes / self.total_bytes
            line += f"  {100 * fraction:.0f}%  ETA {elapsed * (1 - fraction) / fraction:.0f}s"
        sys.stderr.write(line + "   ")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        """Ends the progress line."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False
