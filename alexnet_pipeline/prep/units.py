"""Prep's units of work: a picklable recipe for 64 images (or one class archive) that a worker turns into
`Item`s, one class per kind of source: `FolderUnit` (64 files of class folders or of a flat val folder),
`TarUnit` (members of a flat tar such as ILSVRC2012_img_val.tar), `ClassTarUnit` (one per-class tar inside
ILSVRC2012_img_train.tar) and `HfUnit` (consecutive members of a Hugging Face .tar.gz). Archives are read in
place, nothing is extracted: the outer tar is indexed once (headers only) and each worker seeks to its member
and streams it; each .tar.gz is streamed once, by its own thread (`with_payloads`).
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import os
import queue
import re
import tarfile
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import UserError

HF_SUFFIX = re.compile(r"_(n\d{8})$")
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # EOFError: a gzip cut short


class ArchiveError(UserError):
    """An archive that was readable when the run started no longer is; the message names it."""


MAX_IMAGE_MIB = 256  # far above any photograph; below it a file is read whole


def member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The data of a regular member of an open tar."""
    f = tf.extractfile(member)
    if f is None:  # callers pass regular members only
        raise tarfile.TarError(f"{member.name}: not a regular file")
    return f.read()


def oversize(size: int, max_bytes: int) -> str:
    """The skip reason of a file too large to be a photograph (it is not read)."""
    return (f"{size:,} bytes, larger than any photograph (the limit is {max_bytes // 2**20} MiB, "
            "--max-image-mib); not read")


@dataclass(frozen=True)
class Item:
    """One candidate image: its sample key, label, where it came from (for reports) and its bytes, or why
    they could not be read."""

    key: str
    label: int
    source: str
    data: bytes
    error: str = ""


@dataclass(frozen=True, slots=True)  # one per image: no __dict__ each
class FileEntry:
    path: str
    label: int


@dataclass(frozen=True, slots=True)  # one per image: no __dict__ each
class TarMember:
    """A member of a flat tar (ILSVRC2012_img_val.tar): where its bytes are."""

    offset: int
    size: int
    name: str
    label: int


@dataclass(frozen=True, slots=True)  # one per image: no __dict__ each
class GzMember:
    """A member of a .tar.gz (Hugging Face): its index among the archive's files."""

    index: int
    name: str
    label: int


@dataclass(frozen=True)
class Unit:
    """A picklable recipe for a group of items of one split, which a worker turns into `Item`s. One subclass
    per kind of source: FolderUnit, TarUnit, ClassTarUnit, HfUnit."""

    split: str
    name: str
    expected: int | None = None  # number of items, where known without reading

    def items(self, max_bytes: int = MAX_IMAGE_MIB * 2**20):
        """Yield the unit's `Item`s; unreadable entries, and files larger than `max_bytes` (judged by their
        size before anything is read), come with empty bytes and a reason."""
        raise NotImplementedError

    @property
    def where(self) -> str:
        """What to name when the unit's source fails."""
        return self.name


@dataclass(frozen=True)
class FolderUnit(Unit):
    """Files of a folder (a slice of a class folder, a run of flat val files)."""

    files: tuple[FileEntry, ...] = ()

    def items(self, max_bytes: int = MAX_IMAGE_MIB * 2**20):
        for f in self.files:
            try:
                with open(f.path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size > max_bytes:
                        head = fh.read(4096)
                        kind = " (a file of zeros at its start)" if not head.strip(b"\0") else ""
                        yield Item(sample_key(f.path), f.label, f.path, b"", error=oversize(size, max_bytes) + kind)
                        continue
                    data = fh.read()
                yield Item(sample_key(f.path), f.label, f.path, data)
            except OSError as e:  # a broken or looping symbolic link, a directory, no permission
                yield Item(sample_key(f.path), f.label, f.path, b"", error=f"unreadable ({e.strerror})")



@dataclass(frozen=True)
class TarUnit(Unit):
    """Members of a flat tar, read by seeking to each."""

    archive: str = ""
    members: tuple[TarMember, ...] = ()

    def items(self, max_bytes: int = MAX_IMAGE_MIB * 2**20):
        with open(self.archive, "rb") as f:
            for m in self.members:
                source = f"{self.archive}:{m.name}"
                if m.size > max_bytes:
                    yield Item(sample_key(m.name), m.label, source, b"", error=oversize(m.size, max_bytes))
                    continue
                f.seek(m.offset)
                yield Item(sample_key(m.name), m.label, source, f.read(m.size))


    @property
    def where(self) -> str:
        return self.archive


@dataclass(frozen=True)
class ClassTarUnit(Unit):
    """One per-class tar inside ILSVRC2012_img_train.tar, streamed from its offset (nothing extracted)."""

    archive: str = ""
    offset: int = 0
    size: int = 0
    label: int = -1
    limit: int | None = None

    def items(self, max_bytes: int = MAX_IMAGE_MIB * 2**20):
        with open(self.archive, "rb") as f:
            f.seek(self.offset)
            window = _Window(f, self.size)
            where = f"{self.archive}:{self.name.split('/', 1)[1]}.tar"
            with tarfile.open(fileobj=window, mode="r|") as inner:
                # an oversized member is not read: the stream skips its data in blocks
                members: Iterator[tuple[str, bytes | int]] = (
                    (m.name, member_bytes(inner, m) if m.size <= max_bytes else m.size) for m in inner if m.isfile())
                if self.limit is not None:  # same rule as folders: the first N names in sorted order
                    members = iter(heapq.nsmallest(self.limit, members, key=lambda nm: nm[0]))
                for name, data in members:
                    source = f"{where}/{name}"
                    if isinstance(data, int):
                        yield Item(sample_key(name), self.label, source, b"", error=oversize(data, max_bytes))
                    else:
                        yield Item(sample_key(name), self.label, source, data)


    @property
    def where(self) -> str:
        return f"{self.archive}:{self.name.split('/', 1)[1]}.tar"


@dataclass(frozen=True)
class HfUnit(Unit):
    """Consecutive members of a Hugging Face .tar.gz; `with_payloads` reads their bytes into `payload`."""

    archive: str = ""
    members: tuple[GzMember, ...] = ()
    payload: tuple = ()  # the members' bytes, in member order

    def items(self, max_bytes: int = MAX_IMAGE_MIB * 2**20):
        for m, data in zip(self.members, self.payload, strict=True):
            if isinstance(data, int):  # with_payloads left an oversized member unread: this is its size
                yield Item(hf_key(m.name)[0], m.label, f"{self.archive}:{m.name}", b"", error=oversize(data, max_bytes))
            else:
                yield Item(hf_key(m.name)[0], m.label, f"{self.archive}:{m.name}", data)


    @property
    def where(self) -> str:
        return self.archive


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes of an open file from its current position (a tar member)."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(memoryview(b)[: min(len(b), self.left)])
        self.left -= n
        return n


def sample_key(name) -> str:
    """The sample key of a file: its base name up to the first dot (keys must not contain dots), with any
    byte other than letters, digits, '-', '_' and '~' percent-encoded (a space would split a line of DALI's
    index; a name that is not valid UTF-8 keeps its bytes). ImageNet's own names are unchanged."""
    return urllib.parse.quote(os.fsencode(Path(str(name)).name.split(".", 1)[0]), safe="-_~")


def hf_key(name) -> tuple[str, str | None]:
    """(sample key, wnid) of a Hugging Face member name: n01440764_10026_n01440764.JPEG gives the key of
    n01440764_10026.JPEG (so both layouts give the same samples) and n01440764; a name without the suffix
    (a test image) gives no wnid."""
    stem = Path(str(name)).name.split(".", 1)[0]
    m = HF_SUFFIX.search(stem)
    return sample_key(stem[:m.start()] if m else stem), (m.group(1) if m else None)


def with_payloads(units, queue_size: int = 8, max_bytes: int = MAX_IMAGE_MIB * 2**20):
    """Yield `units`: first those that read their own files, then each HfUnit with its members' bytes attached
    (a member over `max_bytes` as its size, unread), as its archive's reader completes it. Each .tar.gz is
    streamed once, by its own thread (zlib works outside the GIL), so archives are read in parallel; at most
    `queue_size` units wait in memory. Nothing is extracted to disk. Closing the generator stops the readers."""
    yield from (u for u in units if not isinstance(u, HfUnit))
    by_archive: dict[str, list[HfUnit]] = {}
    for u in units:
        if isinstance(u, HfUnit):
            by_archive.setdefault(u.archive, []).append(u)
    if not by_archive:
        return
    readers = _ArchiveReaders(by_archive, queue_size, max_bytes)
    try:
        yield from readers.units()
    finally:
        readers.stop()


class _Filling:
    """The units of one archive, filled with their members' bytes as the archive streams past."""

    def __init__(self, archive_units: list[HfUnit]):
        self.units = archive_units
        self.slot = {m.index: (n, j) for n, u in enumerate(archive_units) for j, m in enumerate(u.members)}
        self.parts: list[list[bytes | int | None] | None] = [[None] * len(u.members) for u in archive_units]
        self.missing = [len(u.members) for u in archive_units]
        self.open = sum(1 for k in self.missing if k)  # a count, not any(missing): a scan per member is quadratic

    def take(self, index: int, data: bytes | int) -> HfUnit | None:
        """Member `index`'s bytes (or size); the unit this completes, if it does."""
        n, j = self.slot[index]
        got = self.parts[n]
        assert got is not None  # a unit's list goes only once it is complete
        got[j] = data
        self.missing[n] -= 1
        if self.missing[n]:
            return None
        self.open -= 1
        self.parts[n] = None
        return dataclasses.replace(self.units[n], payload=tuple(got))


class _ArchiveReaders:
    """A thread per archive, each putting the units it completes, then DONE (or its error: an ArchiveError, or
    the exception of a bug), on one bounded queue."""

    DONE = object()

    def __init__(self, by_archive: dict[str, list[HfUnit]], queue_size: int, max_bytes: int):
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stopping, self.max_bytes = threading.Event(), max_bytes
        self.threads = [threading.Thread(target=self._read, args=item, daemon=True) for item in by_archive.items()]
        for t in self.threads:
            t.start()

    def units(self):
        """The completed units as they come; a reader's error raised here."""
        finished = 0
        while finished < len(self.threads):
            item = self.queue.get()
            if item is self.DONE:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()

    def _put(self, item) -> None:
        """Onto the queue, unless the readers are stopping (then the item is dropped: nobody takes it)."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read(self, archive: str, archive_units: list[HfUnit]) -> None:
        filling = _Filling(archive_units)
        try:
            with tarfile.open(archive, "r|gz") as tf:
                for i, member in enumerate(m for m in tf if m.isfile()):
                    if self.stopping.is_set() or not filling.open:
                        break
                    if i in filling.slot:
                        data = member_bytes(tf, member) if member.size <= self.max_bytes else member.size
                        complete = filling.take(i, data)
                        if complete is not None:
                            self._put(complete)
            if filling.open:
                raise EOFError("fewer members than when it was first read")
            self._put(self.DONE)
        except ARCHIVE_ERRORS as e:
            self._put(ArchiveError(f"{archive}: unreadable or truncated ({e or type(e).__name__}); it was readable "
                                   "when this run started"))
        except BaseException as e:  # noqa: BLE001
            # a bug: raised with its traceback where the units are taken (a reader that just ended would leave
            # units() waiting for its DONE forever)
            self._put(e)
