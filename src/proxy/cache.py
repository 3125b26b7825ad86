"""A least-recently-used cache of generated images, bounded by the bytes it holds.

Only requests with an explicit seed are cached: the same body with the same seed gives the same
image, so a repeat (a page reloaded, a "reuse settings" click) costs nothing upstream.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

__all__ = ["ImageCache"]


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class ImageCache(Generic[V]):
    """LRU mapping of request fingerprints to results, holding at most `max_bytes` of images.

    Args:
        max_bytes: Capacity; 0 disables the cache. A single item larger than this is not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, V] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        """The cached value for `key` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: V) -> None:
        """Store `value`, evicting the least recently used items to stay within `max_bytes`."""
        if value.nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def snapshot(self) -> dict[str, int]:
        """Counters for `GET /usage`."""
        return {
            "items": len(self._items),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }
