"""Usage rows the database cannot take right now, kept on local disk until it can.

Layout: ``<data_path>/spool/<database>/usage-<pid>-<token>-<n>.jsonl``, where ``<database>`` is a
digest of the database URL (two gateways sharing a data directory never replay each other's
rows into the wrong database). Each line is one ``UsageEntry`` as JSON (msgspec: prices as
decimal strings, times as RFC 3339), so values come back exactly as they were written.

Every process appends to a segment of its own, holding an exclusive ``flock`` on it for as long as
it may write there; a segment is fsynced before ``append`` returns. A replayer claims a segment by
taking that lock without waiting: a segment whose writer is alive is skipped, one whose writer
died (even by SIGKILL, which releases the lock) is taken over by whichever process comes first.
To replay what it spooled itself, a process seals its segment (closes it) and starts a new one
with its next append; a segment is also sealed once it holds ``MAX_SEGMENT_BYTES``. A segment is
deleted only after its rows are committed, so a crash at any point replays it again, and the
insert is idempotent by request id.

A crash in the middle of an append leaves a last line without its newline; that line belongs to a
request whose ``record`` never returned, and the reader skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from sqlalchemy.engine import make_url

from gateway.accounting.usage.entry import UsageEntry

logger = logging.getLogger(__name__)

SEGMENT_GLOB = "usage-*.jsonl"
MAX_SEGMENT_BYTES = 4 << 20
"""About 10,000 rows: a long outage leaves many segments, each replayed and deleted on its own."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageEntry)

Insert = Callable[[list[UsageEntry]], Awaitable[int]]
"""Commits entries (already present ones count as done) and returns how many the database refused."""


def spool_directory(data_path: Path, database_url: str) -> Path:
    """Where usage rows for ``database_url`` are spooled."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        # A relative SQLite path names a different file in each working directory.
        url = url.set(database=str(Path(url.database).resolve()))
    # Not the driver nor the password: neither changes which database the rows belong to.
    identity = f"{url.get_backend_name()}://{url.username or ''}@{url.host or ''}:{url.port or ''}/{url.database}"
    return data_path / "spool" / hashlib.sha256(identity.encode()).hexdigest()[:16]


def encode_lines(entries: Iterable[UsageEntry]) -> bytes:
    return b"".join(_encoder.encode(entry) + b"\n" for entry in entries)


def decode_lines(data: bytes, source: Path) -> list[UsageEntry]:
    """The entries of a segment's bytes; a torn last line and unreadable lines are logged and skipped."""
    lines = data.split(b"\n")
    torn = lines.pop()  # empty when the data ends with a newline, as every complete append does
    if torn:
        logger.warning("skipping the unfinished last line of %s (a crash during its write): %r", source, torn[:200])
    entries: list[UsageEntry] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.error("skipping unreadable usage line %d of %s (%s): %r", number, source, exc, line)
    return entries


@dataclass(frozen=True, slots=True)
class ReplayResult:
    rows: int
    """Entries committed from the spool (or found already committed)."""
    refused: int
    """Entries the database refused for good (logged with their content)."""


class _Segment:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0


class UsageSpool:
    """This process's way into the spool directory: append, seal, replay (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._name = f"usage-{os.getpid()}-{secrets.token_hex(4)}"
        self._serial = 0
        self._segment: _Segment | None = None
        # Appends and seals run on worker threads; the segment's descriptor changes only under this lock.
        self._segment_lock = threading.Lock()

    async def append(self, entries: Sequence[UsageEntry]) -> None:
        """Write the entries and fsync them; raises ``OSError`` when they may not be durable."""
        await asyncio.to_thread(self._append, encode_lines(entries))

    async def seal(self) -> None:
        """Close this process's segment, so that a replayer can claim it; the next append opens another."""
        await asyncio.to_thread(self._seal)

    def segments(self) -> list[Path]:
        """Every segment in the directory, this process's own included."""
        try:
            return sorted(self.directory.glob(SEGMENT_GLOB))
        except OSError:
            return []

    def size_bytes(self) -> int:
        total = 0
        for path in self.segments():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    async def replay(self, insert: Insert) -> ReplayResult:
        """Insert every segment no live writer holds, deleting each once its rows are committed.

        This process's own segment is sealed first. An error from ``insert`` stops the round and
        propagates; the segment it was inserting stays for the next round.
        """
        await self.seal()
        rows = refused = 0
        for path in self.segments():
            # Claimed on the event loop, not a thread: a cancelled claim must not leave a lock behind.
            claimed = _claim(path)
            if claimed is None:
                continue
            fd, entries = claimed
            try:
                rejected = await insert(entries) if entries else 0
                await asyncio.to_thread(_remove, path)
            finally:
                os.close(fd)
            rows += len(entries) - rejected
            refused += rejected
        return ReplayResult(rows, refused)

    def close(self) -> None:
        self._seal()

    def _append(self, data: bytes) -> None:
        with self._segment_lock:
            segment = self._segment or self._open_segment()
            try:
                _write_all(segment.fd, data)
                os.fdatasync(segment.fd)
            except OSError:
                # Cut the partial write off, so that later appends do not glue onto a broken line;
                # and start a new segment, since this one's state on disk is now uncertain.
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, segment.size)
                self._seal_locked()
                raise
            segment.size += len(data)
            if segment.size >= MAX_SEGMENT_BYTES:
                self._seal_locked()

    def _open_segment(self) -> _Segment:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_directory(self.directory.parent)
        while True:
            self._serial += 1
            path = self.directory / f"{self._name}-{self._serial:06d}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            # A replayer may have claimed the new, empty file before this lock: it then deletes it,
            # and the file this descriptor holds is no longer in the directory. Take another name.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_linked(path, fd):
                _fsync_directory(self.directory)
                self._segment = _Segment(path, fd)
                return self._segment
            os.close(fd)

    def _seal(self) -> None:
        with self._segment_lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            os.close(segment.fd)


def _claim(path: Path) -> tuple[int, list[UsageEntry]] | None:
    """Lock and read a segment, or None when another process holds it or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another replayer may have deleted it between our open and our lock.
        if not _is_linked(path, fd):
            os.close(fd)
            return None
        return fd, decode_lines(_read_all(fd), path)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _remove(path: Path) -> None:
    path.unlink()
    _fsync_directory(path.parent)


def _is_linked(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation or removal durable, not only its contents."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
