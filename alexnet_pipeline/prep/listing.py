"""The source listing: every file prep reads (images, archives, label and name files) with its size and
modification time, as one canonical byte string, and the file that holds it (SHARDS/source.listing.gz, and
.work/source.listing.gz while a run is in progress). Also the archive cache: what was read out of an archive
(its member names or offsets), kept beside the output and keyed on the archive's size and time.

The listing is made one directory at a time (`scan`: os.scandir, one stat per file, no Path objects), so
prep's workers can list 1,000 class folders in parallel and hand back a few bytes objects. Its bytes: for each
directory, in sorted order of its path relative to the source root, the path and the number of its entries,
then per entry (sorted by name) the name, the size and mtime_ns; every field NUL-terminated, names as the file
system's bytes (a name that is not valid UTF-8 is kept). A link that leads nowhere is listed with size and
time -1, so that its repair counts as a change. The manifest records the listing's sha256: a re-run compares
digests and reads a stored listing only to say what changed. Imports only files (for atomic writes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import files

SOURCE = "source.listing.gz"
ARCHIVES = ".archives.json.gz"  # machine-local: what was read out of each archive, keyed on its size and time


@dataclass(frozen=True)
class Folder:
    """The listed files of one directory: its path relative to the source root ("" for the root itself) and its
    entries as listing bytes (name, size, mtime_ns per entry, sorted by name)."""

    rel: str
    count: int
    chunk: bytes

    def entries(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of every entry, in name order."""
        fields = self.chunk.split(b"\0")
        return [(os.fsdecode(fields[i]), int(fields[i + 1]), int(fields[i + 2])) for i in range(0, 3 * self.count, 3)]

    def names(self) -> list[str]:
        return [os.fsdecode(n) for n in self.chunk.split(b"\0")[0:3 * self.count:3]]


def _chunk(rows: list[tuple[bytes, int, int]]) -> bytes:
    rows.sort()
    return b"".join(b"%s\0%d\0%d\0" % row for row in rows)


def scan(root: str, rel: str) -> Folder:
    """The regular files of root/rel (links followed; sub-folders left out), one stat each."""
    rows = []
    with os.scandir(os.path.join(root, rel) if rel else root) as entries:
        for e in entries:
            try:
                if e.is_dir():
                    continue
                st = e.stat()
            except OSError:  # a link that leads nowhere, or in a loop: listed, so that prep reports it
                if e.is_symlink():
                    rows.append((os.fsencode(e.name), -1, -1))
                continue
            if stat.S_ISREG(st.st_mode):
                rows.append((os.fsencode(e.name), st.st_size, st.st_mtime_ns))
    return Folder(rel, len(rows), _chunk(rows))


def some_files(root: str, rel: str, names: list[str]) -> Folder:
    """Named files of root/rel (archives, label files), one stat each; a missing one as -1."""
    rows = []
    for name in names:
        try:
            st = os.stat(os.path.join(root, rel, name))
            rows.append((os.fsencode(name), st.st_size, st.st_mtime_ns))
        except OSError:
            rows.append((os.fsencode(name), -1, -1))
    return Folder(rel, len(rows), _chunk(rows))


class Listing:
    """The listing of a source: its folders, each at most once (files named twice in one folder once)."""

    def __init__(self, folders=()):
        self._folders: dict[str, Folder] = {}
        for f in folders:
            self.add(f)

    def add(self, folder: Folder) -> None:
        old = self._folders.get(folder.rel)
        if old is not None:  # e.g. two archives of the root listed separately
            rows = {(os.fsencode(n), s, m) for n, s, m in old.entries() + folder.entries()}
            folder = Folder(folder.rel, len(rows), _chunk(list(rows)))
        self._folders[folder.rel] = folder

    def __len__(self) -> int:
        return sum(f.count for f in self._folders.values())

    def to_bytes(self) -> bytes:
        return b"".join(b"%s\0%d\0" % (os.fsencode(rel), self._folders[rel].count) + self._folders[rel].chunk
                        for rel in sorted(self._folders))

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Listing":
        folders, at = [], 0
        while at < len(data):
            end_rel = data.index(b"\0", at)
            end_count = data.index(b"\0", end_rel + 1)
            count, end = int(data[end_rel + 1:end_count]), end_count + 1
            for _ in range(3 * count):  # the folder's chunk ends after 3 fields per entry
                end = data.index(b"\0", end) + 1
            folders.append(Folder(os.fsdecode(data[at:end_rel]), count, data[end_count + 1:end]))
            at = end
        return cls(folders)

    def files(self) -> dict[str, tuple[int, int]]:
        """{path relative to the root: (size, mtime_ns)}."""
        return {os.path.join(f.rel, n) if f.rel else n: (size, mtime)
                for f in self._folders.values() for n, size, mtime in f.entries()}


def changes(old: Listing, new: Listing) -> str:
    """'N added, M removed, K changed (first: ...)' between two listings; empty when they are equal."""
    a, b = old.files(), new.files()
    added, removed = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
    changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    if not (added or removed or changed):
        return ""
    first = [f"+{n}" for n in added[:2]] + [f"-{n}" for n in removed[:2]] + [f"~{n}" for n in changed[:2]]
    return f"{len(added)} added, {len(removed)} removed, {len(changed)} changed ({', '.join(first)})"


def write(directory: Path, listing: Listing) -> None:
    """DIRECTORY/source.listing.gz: the same bytes for the same listing."""
    files.atomic_write(Path(directory) / SOURCE, gzip.compress(listing.to_bytes(), compresslevel=1, mtime=0))


class ListingError(ValueError):
    """A stored listing that cannot be read; the message names it."""


def read(directory: Path) -> Listing | None:
    """The listing `write` wrote, or None when there is none."""
    path = Path(directory) / SOURCE
    if not path.is_file():
        return None
    try:
        return Listing.from_bytes(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise ListingError(f"{path}: unreadable ({e})") from None


class ArchiveCache:
    """What was read out of archives ({archive: [size, mtime_ns, value]}), kept in OUT/.archives.json.gz so that a
    re-run or a resume does not decompress ~147 GB of Hugging Face archives to list them again. A value is
    trusted only while its archive keeps its size and modification time."""

    def __init__(self, directory: Path | None):
        self.path = None if directory is None else Path(directory) / ARCHIVES
        self.entries: dict = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(gzip.decompress(self.path.read_bytes()))
            except (OSError, EOFError, ValueError):
                self.entries = {}  # a damaged cache: the archives are read again

    def get(self, archive: Path, make):
        """The cached value for `archive`, or make(archive) (then remembered)."""
        st = os.stat(archive)
        key = str(Path(archive).resolve())
        hit = self.entries.get(key)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        value = make(archive)
        self.entries[key] = [st.st_size, st.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.path is not None and self.dirty:
            files.atomic_write(self.path, gzip.compress(json.dumps(self.entries).encode(), mtime=0), durable=False)
            self.dirty = False
