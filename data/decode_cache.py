"""Decoded images kept across epochs by a long-lived map actor (:mod:`data.run_stream`).

Why: at 28 px, decoding a PNG costs about a fifth of a multi-crop view's CPU (46 of 223 us per image on
the bench host), and a one-execution stream's actors live for the whole run. An actor that keeps the
pixels it decoded pays the decode once a run instead of once an epoch. The augmentation is seeded by
``(seed, epoch, index)`` and never by what was cached, so the views are the same bit for bit.

The budget is in bytes per actor, evicted a whole shard file at a time, least recently used first. A data
set larger than the budget keeps what fits and decodes the rest as before; it never costs more than
the decode it saves, plus the memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: bytes counted per cached row beyond its pixels (the tensor object and the dict slot)
ROW_OVERHEAD = 512
#: returned by :meth:`DecodeCache.get` for a row not in the cache (``None`` is a cached corrupt row)
MISS = object()


class DecodeCache:
    """``(file, row) -> decoded image`` (a uint8 tensor, or ``None`` for a row that does not decode),
    up to ``budget_bytes``; ``hits`` / ``misses`` count the lookups."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._files: OrderedDict[int, dict[int, torch.Tensor | None]] = OrderedDict()
        self._file_bytes: dict[int, int] = {}

    def get(self, file: int, row: int) -> torch.Tensor | None | object:
        """The cached image of ``row`` of ``file``, ``None`` when it was corrupt, :data:`MISS` when unknown."""
        rows = self._files.get(file)
        if rows is not None and row in rows:
            self.hits += 1
            self._files.move_to_end(file)
            return rows[row]
        self.misses += 1
        return MISS

    def put(self, file: int, row: int, image: torch.Tensor | None) -> bool:
        """Keep ``image``; evicts the least recently used other files to make room. Returns whether it
        was kept (not when the file alone would pass the budget)."""
        if row in self._files.get(file, ()):
            self._files.move_to_end(file)
            return True
        size = ROW_OVERHEAD + (image.numel() * image.element_size() if image is not None else 0)
        while self.bytes + size > self.budget:
            victim = next((f for f in self._files if f != file), None)
            if victim is None:
                return False
            del self._files[victim]
            self.bytes -= self._file_bytes.pop(victim)
        rows = self._files.setdefault(file, {})
        self._files.move_to_end(file)
        rows[row] = image
        self._file_bytes[file] = self._file_bytes.get(file, 0) + size
        self.bytes += size
        return True

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._files.values())
