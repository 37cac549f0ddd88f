"""Progress on stderr (tqdm, TTY only): tokens written with tokens/s, documents, split documents,
and the share of the input read with an ETA."""

from __future__ import annotations

import shutil

from tqdm import tqdm


class Progress:
    """One tqdm bar counting tokens; documents and the input share read ride along as postfix.

    The bar moves per task, so it keeps moving through one giant document (its pieces).

    Args:
        total_bytes: input size on disk (compressed size for ``.gz``), for the ETA.
        log_interval: documents between postfix updates.
        enabled: False for ``--quiet``; output is also off when stderr is not a terminal.
    """

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool = True) -> None:
        self.total_bytes = total_bytes
        self.log_interval = log_interval
        self.read_bytes = 0
        self._next = 0
        self._bar = tqdm(
            unit="tok",
            unit_scale=True,
            disable=None if enabled else True,
            ncols=shutil.get_terminal_size((120, 20)).columns,  # a 0-wide pty would print nothing
        )
        self.enabled = not self._bar.disable

    def update(self, num_documents: int, num_tokens: int, num_split: int = 0) -> None:
        """Reports counts so far (tokens every call; documents every ``log_interval``)."""
        if not self.enabled:
            return
        if num_documents >= self._next:
            self._next = num_documents + self.log_interval
            parts = [f"{num_documents:,} docs", f"{num_split:,} split"]
            if self.total_bytes and 0 < self.read_bytes <= self.total_bytes:
                fraction = self.read_bytes / self.total_bytes
                elapsed = self._bar.format_dict["elapsed"]
                parts.append(f"{100 * fraction:.0f}% read, ETA {elapsed * (1 / fraction - 1):.0f}s")
            self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(num_tokens - self._bar.n)

    def close(self) -> None:
        """Ends the bar."""
        self._bar.close()
