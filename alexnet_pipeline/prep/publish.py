"""Publishing a prepared directory to a store (alexnet-prep --out s3://bucket/prefix): prep runs in a local
work directory (resumable as always), then every finished file is uploaded and the manifest goes last, so a
reader never finds a manifest whose shards are not all in place.

- A dataset already published there with another manifest loses its manifest first: while the new files go
  up, readers find no dataset rather than a mix of two.
- A re-run uploads only what is missing or differs: a file whose upload is recorded (`.published.json` in the
  work directory: the local file's size and time, the object's size and ETag after the upload) and whose
  object still has that size and ETag is left alone; so is an object whose ETag is the local file's MD5 (a
  single-part upload of the same bytes), whatever the record says.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import files, storage
from ..shards import MANIFEST, load_manifest

RECORD = ".published.json"


@dataclass
class Published:
    url: str
    uploaded: int
    kept: int
    bytes: int


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _listing(store: storage.Store, splits) -> dict[str, tuple[int, str]]:
    """{relative name: (size, ETag)} of the objects at the top of the location and in each split's folder."""
    return {f"{prefix}/{name}" if prefix else name: stamp for prefix in ("", *splits)
            for name, stamp in store.stamps(prefix).items()}


def publish(local: Path, url: str, threads: int = 8, progress=None) -> Published:
    """Upload the prepared directory `local` to `url`, the manifest last; `progress.update()` per file."""
    store, local = storage.store(url), Path(local)
    manifest = load_manifest(local)
    names = [p.name for p in sorted(local.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name != MANIFEST]  # stats, timm's _info.json, the source listing
    for split, entry in manifest.splits.items():
        for shard in entry.shards:
            names += [f"{split}/{shard.name}", f"{split}/{Path(shard.name).with_suffix('.idx').name}"]
    remote = _listing(store, manifest.splits)
    record_path = local / RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}

    def unchanged(name: str) -> bool:
        st = (local / name).stat()
        theirs = remote.get(name)
        if theirs is None or theirs[0] != st.st_size:
            return False
        if record.get(name) == [st.st_size, st.st_mtime_ns, *theirs]:
            return True
        return theirs[1] == _md5(local / name)  # a single-part upload's ETag is the MD5 of its bytes

    new_manifest = (local / MANIFEST).read_bytes()
    if MANIFEST in remote and store.read_bytes(MANIFEST) != new_manifest:
        store.delete(MANIFEST)  # readers see no dataset until the new one is whole
    todo = [n for n in names if not unchanged(n)]
    kept = len(names) - len(todo)
    if progress is not None:
        progress.update(kept)

    def upload(name: str) -> int:
        store.upload(local / name, name)
        if progress is not None:
            progress.update(1)
        return (local / name).stat().st_size

    with ThreadPoolExecutor(threads) as pool:
        sent = sum(pool.map(upload, todo))
    remote = _listing(store, manifest.splits)
    record = {}
    for name in names:
        st = (local / name).stat()
        if name in remote:
            record[name] = [st.st_size, st.st_mtime_ns, *remote[name]]
    files.atomic_write(record_path, json.dumps(record, indent=0).encode(), durable=False)
    uploaded = len(todo)
    if MANIFEST not in remote or store.read_bytes(MANIFEST) != new_manifest:
        store.upload(local / MANIFEST, MANIFEST)  # last: the dataset exists from here on
        sent += len(new_manifest)
        uploaded += 1
    else:
        kept += 1
    if progress is not None:
        progress.update(1)
    return Published(url, uploaded, kept, sent)
