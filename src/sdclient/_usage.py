"""Usage counters per model, optional budgets, optional SQLite persistence.

Counters are kept as ``(model, counter) -> value`` rows. With a ``path`` they live in an SQLite file
and every update is one transaction of ``value = value + ?`` upserts, so several processes (or
threads, or clients) can share one file without losing counts. Without a path they live in memory.

Budgets (``max_images``, ``max_characters``) are checked before a request is sent: a call that
would exceed one raises :class:`~sdclient.UsageLimitExceeded` and sends nothing. When a call brings
usage to 80 % of a budget, a :class:`UsageWarning` is issued with :func:`warnings.warn` (once per
tracker and budget; warnings show in scripts and notebooks, and the ``warnings`` filters silence or
escalate them). Calls in flight in this process count against the budget; calls in other processes
sharing the file are seen once they finish, so concurrent processes can overshoot by what they have
in flight.
"""

from __future__ import annotations

import sqlite3
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field, computed_field

from ._exceptions import UsageLimitExceeded

__all__ = ["ModelUsage", "UsageSnapshot", "UsageTracker", "UsageWarning"]

_FAILURE_PREFIX = "failures."
_WARN_FRACTION = 0.8
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    model   TEXT NOT NULL,
    counter TEXT NOT NULL,
    value   REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (model, counter)
)
"""
_UPSERT = (
    "INSERT INTO usage (model, counter, value) VALUES (?, ?, ?) "
    "ON CONFLICT (model, counter) DO UPDATE SET value = value + excluded.value"
)


class UsageWarning(UserWarning):
    """Usage reached 80 % of a budget."""


class ModelUsage(BaseModel):
    """What one model (or all of them, in :attr:`UsageSnapshot.total`) has used."""

    requests: int = 0
    """HTTP requests sent (every attempt and cold-start probe)."""
    images: int = 0
    """Images received."""
    prompt_characters: int = 0
    """Characters of prompt and negative prompt, counted once per call that was sent."""
    compute_seconds: float = 0.0
    """Seconds of generation: the server's ``x-compute-time`` where it reports one (what hosted
    inference bills by), else the measured time of the answered request (a provider's job from
    leaving its queue to the image), so an endpoint without the header never counts 0 s."""
    cold_start_waits: int = 0
    """Cold starts waited out (one per loading episode, however many calls shared it)."""
    cold_start_wait_seconds: float = 0.0
    """How long those cold starts lasted."""
    retries: int = 0
    """Re-sends after transient failures (429, 5xx, connection errors); cold-start probes excluded."""
    failures: dict[str, int] = Field(default_factory=dict)
    """Calls that failed, by error class name (``RateLimited``, ``ModelNotFound``, ...)."""

    @classmethod
    def from_counters(cls, counters: Mapping[str, float]) -> ModelUsage:
        """Build from ``counter -> value`` rows."""
        fields: dict[str, float] = {}
        failures: dict[str, int] = {}
        for name, value in counters.items():
            if name.startswith(_FAILURE_PREFIX):
                failures[name.removeprefix(_FAILURE_PREFIX)] = round(value)
            elif name in cls.model_fields:
                fields[name] = value
        values: dict[str, object] = {k: (v if k.endswith("seconds") else round(v)) for k, v in fields.items()}
        return cls.model_validate({**values, "failures": failures})


class UsageSnapshot(BaseModel):
    """Usage at one moment: per model and in total."""

    models: dict[str, ModelUsage] = Field(default_factory=dict)
    """Usage per model id or endpoint URL."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> ModelUsage:
        """Everything summed over the models."""
        total = ModelUsage()
        for usage in self.models.values():
            for name in ModelUsage.model_fields:
                if name != "failures":
                    setattr(total, name, getattr(total, name) + getattr(usage, name))
            for kind, count in usage.failures.items():
                total.failures[kind] = total.failures.get(kind, 0) + count
        return total


class UsageTracker:
    """Counts requests, images, characters, compute seconds, cold starts, retries and failures.

    Args:
        path: An SQLite file to persist the counters in (created if missing); ``None`` keeps them
            in memory. Several processes may share one file.
        max_images: Budget of images over all models, or ``None`` for no limit.
        max_characters: Budget of prompt characters over all models, or ``None``.

    Example:
        ```python
        usage = UsageTracker("usage.db", max_images=100)
        async with SDClient("user/model", usage=usage) as client:
            await client.generate("a red fox")
        print(usage.snapshot().total.images)
        ```
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_images: int | None = None,
        max_characters: int | None = None,
    ) -> None:
        for name, limit in (("max_images", max_images), ("max_characters", max_characters)):
            if limit is not None and limit < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {limit}")
        self.path = Path(path) if path is not None else None
        self.max_images = max_images
        self.max_characters = max_characters
        self._lock = threading.Lock()
        self._memory: dict[str, dict[str, float]] = {}
        self._pending = {"images": 0, "prompt_characters": 0}
        self._warned: set[str] = set()
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            # WAL: readers never block the writer, and a commit is one append (fsync'd at
            # checkpoints with synchronous=NORMAL: a crash of the process loses nothing).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction() as db:
                db.execute(_SCHEMA)

    def __repr__(self) -> str:
        path = str(self.path) if self.path else None
        return (
            f"UsageTracker(path={path!r}, max_images={self.max_images}, max_characters={self.max_characters})"
        )

    def close(self) -> None:
        """Close the SQLite connection (counters in memory stay readable)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        assert self._db is not None
        db = self._db
        # IMMEDIATE takes the write lock up front, so concurrent writers queue (busy timeout)
        # instead of failing with "database is locked" on upgrade from a read lock.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record(
        self,
        model: str,
        *,
        requests: int = 0,
        images: int = 0,
        prompt_characters: int = 0,
        compute_seconds: float = 0.0,
        cold_start_waits: int = 0,
        cold_start_wait_seconds: float = 0.0,
        retries: int = 0,
        failure: str | None = None,
    ) -> None:
        """Add to the counters of ``model`` (one transaction when persisted).

        Args:
            model: Model id or endpoint URL.
            requests: HTTP requests sent.
            images: Images received.
            prompt_characters: Characters of prompt (and negative prompt).
            compute_seconds: Server compute time.
            cold_start_waits: Cold-start episodes.
            cold_start_wait_seconds: Their length.
            retries: Re-sends after transient failures.
            failure: The error class name of a failed call.
        """
        deltas: dict[str, float] = {
            "requests": requests,
            "images": images,
            "prompt_characters": prompt_characters,
            "compute_seconds": compute_seconds,
            "cold_start_waits": cold_start_waits,
            "cold_start_wait_seconds": cold_start_wait_seconds,
            "retries": retries,
        }
        if failure is not None:
            deltas[_FAILURE_PREFIX + failure] = 1
        rows = [(model, name, value) for name, value in deltas.items() if value]
        if not rows:
            return
        with self._lock:
            if self._db is not None:
                with self._transaction() as db:
                    db.executemany(_UPSERT, rows)
            else:
                counters = self._memory.setdefault(model, {})
                for _, name, value in rows:
                    counters[name] = counters.get(name, 0.0) + value

    def _counters(self) -> dict[str, dict[str, float]]:
        if self._db is None:
            return {model: dict(counters) for model, counters in self._memory.items()}
        result: dict[str, dict[str, float]] = {}
        for model, name, value in self._db.execute("SELECT model, counter, value FROM usage"):
            result.setdefault(model, {})[name] = value
        return result

    def snapshot(self) -> UsageSnapshot:
        """Read the counters now (from the file, when persisted: other processes included).

        Returns:
            A :class:`UsageSnapshot`.
        """
        with self._lock:
            counters = self._counters()
        return UsageSnapshot(models={m: ModelUsage.from_counters(c) for m, c in sorted(counters.items())})

    def _used(self, counter: str) -> float:
        if self._db is None:
            return sum(c.get(counter, 0.0) for c in self._memory.values())
        row = self._db.execute("SELECT COALESCE(SUM(value), 0) FROM usage WHERE counter = ?", (counter,))
        return float(row.fetchone()[0])

    @contextmanager
    def reserve(self, *, images: int, characters: int) -> Iterator[None]:
        """Check the budgets for one call and hold its share while it runs.

        Args:
            images: Images the call will produce.
            characters: Prompt characters it will send.

        Raises:
            UsageLimitExceeded: A budget would be exceeded; the caller must not send.
        """
        wanted = {"images": (images, self.max_images), "prompt_characters": (characters, self.max_characters)}
        budgets = {name: (n, limit) for name, (n, limit) in wanted.items() if limit is not None}
        if not budgets:
            yield
            return
        to_warn: list[str] = []
        with self._lock:
            for counter, (n, limit) in budgets.items():
                assert limit is not None
                used = self._used(counter) + self._pending[counter]
                label = "images" if counter == "images" else "characters"
                if used + n > limit:
                    raise UsageLimitExceeded(budget=label, limit=limit, used=used, requested=n)
                if used + n >= _WARN_FRACTION * limit and label not in self._warned:
                    self._warned.add(label)
                    to_warn.append(f"{label} usage at {used + n:g} of the budget {limit:g} (>= 80 %)")
            for counter, (n, _) in budgets.items():
                self._pending[counter] += n
        for message in to_warn:
            warnings.warn(message, UsageWarning, stacklevel=5)  # the caller of generate()
        try:
            yield
        finally:
            with self._lock:
                for counter, (n, _) in budgets.items():
                    self._pending[counter] -= n
