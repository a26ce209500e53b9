"""Where shards live: a local directory, or a store reached through fsspec (s3://, gs://, http(s)://, file://,
any protocol fsspec knows). The one place that talks to a store: every read, listing, download and upload of a
remote dataset goes through `Store`, which says what went wrong in one line naming the URL.

Credentials and endpoints come the way users set them for their store's own tools: for S3 the AWS_* variables,
~/.aws, AWS_ENDPOINT_URL for MinIO and other S3-compatible stores (boto reads them, and signs the URLs that
S3 objects are read by; only AWS_CA_BUNDLE is read here too, for those reads).

Failures, by kind:
- the store unreachable or failing (refused connections, timeouts, 5xx): retried with backoff for up to
  `timeout` seconds; then `StoreGone`, which the commands print as one line with exit status 1;
- missing credentials, a missing bucket or object, access denied: `StoreError` at once (a UserError: one
  line, exit status 2), so that a wrong set-up is named before any work.

Imports fsspec (and through it the store's package) only when a URL is used; a local directory needs neither.
"""

from __future__ import annotations

import errno
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import UserError

RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between tries: doubling from the first up to the most


def is_url(where) -> bool:
    """Whether `where` names a store rather than a local path (it has a protocol, like s3:// or file://)."""
    return "://" in str(where)


def location(where) -> str | Path:
    """A location as given: a URL stays text (Path would fold its //), anything else is a Path."""
    return str(where).rstrip("/") if is_url(where) else Path(where)


def join(where, *parts: str) -> str | Path:
    """`where` / parts, for a URL or a path."""
    if is_url(where):
        return "/".join([str(where).rstrip("/"), *parts])
    return Path(where).joinpath(*parts)


def with_suffix(where, suffix: str) -> str | Path:
    """`where` with its last suffix replaced (a shard's index beside it), for a URL or a path."""
    if not is_url(where):
        return Path(where).with_suffix(suffix)
    head, _, name = str(where).rpartition("/")
    return f"{head}/{Path(name).with_suffix(suffix).name}"


class StoreError(UserError):
    """A set-up problem with a store: no credentials, no bucket, no object, no permission. Named at once."""


class StoreGone(Exception):
    """The store kept failing for longer than the retry time: one line naming the URL and the last error; the
    commands exit with status 1 (the data is not at fault; the same command continues later)."""


def _fatal(e: BaseException) -> bool:
    """Whether `e` is a set-up problem that no retry cures."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
                "InvalidConfigError", "ProfileNotFound"}:
        return True
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                      ImportError)):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM)


def _http_error(e: urllib.error.HTTPError) -> Exception | None:
    """An S3 error response to a presigned GET: a missing object FileNotFoundError (a set-up problem), a
    server's trouble ConnectionError (retried); None for any other (a refusal, a redirect to the bucket's
    region, a malformed request), which the caller asks again through s3fs: botocore follows region redirects
    and names refusals in its own words."""
    try:
        code = re.search(rb"<Code>([^<]*)</Code>", e.read() or b"")
    except OSError:
        code = None
    text = f"HTTP {e.code} {e.reason}" + (f" ({code.group(1).decode(errors='replace')})" if code else "")
    if e.code == 404:
        return FileNotFoundError(text)
    if e.code >= 500 or e.code in (408, 429):
        return ConnectionError(text)
    return None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:300] + "..."


class Store:
    """One remote location (a URL, no trailing slash) with the fsspec filesystem that reaches it."""

    def __init__(self, url: str, timeout: float = 120.0):
        if not is_url(url):
            raise ValueError(f"not a URL: {url}")
        self.url, self.timeout = str(url).rstrip("/"), timeout
        self.protocol = self.url.split("://", 1)[0]
        try:
            self.fs = self._filesystem()
        except ImportError as e:  # gs:// without gcsfs, say
            raise StoreError(f"{self.url}: fsspec cannot reach {self.protocol}:// here ({_short(e)}); install the "
                             "package it names (s3fs for s3://, gcsfs for gs://)") from None
        except ValueError as e:
            raise StoreError(f"{self.url}: {_short(e)}") from None

    def child(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def _path(self, rel: str) -> str:
        # fsspec's S3 and GCS paths carry no protocol; file:// and http(s):// keep what strip_protocol leaves
        return self.fs._strip_protocol(self.child(rel)) if rel else self.fs._strip_protocol(self.url)

    def _call(self, rel: str, what: str, fn):
        """fn() retried with backoff while the store fails in a way that can pass; StoreError for a set-up
        problem, StoreGone once `timeout` seconds have gone by."""
        deadline, wait = time.monotonic() + self.timeout, RETRY_FIRST
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 (fsspec's stores raise their own types; sorted below)
                url = self.child(rel) if rel else self.url
                if _fatal(e):
                    hint = "" if not isinstance(e, FileNotFoundError) else " (no such object or bucket)"
                    raise StoreError(f"{url}: cannot {what}: {_short(e)}{hint}") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreGone(f"{url}: cannot {what} ({_short(e)}); gave up after retrying for "
                                    f"{self.timeout:g} s (--storage-timeout)") from None
                time.sleep(min(wait, left))
                wait = min(2 * wait, RETRY_MAX)
                self._reconnect()

    def _filesystem(self, fresh: bool = False):
        """fsspec's filesystem for the protocol. S3's own retries are turned off (botocore's and s3fs's would
        each retry for tens of seconds): `_call` retries, for `timeout` seconds in all."""
        import fsspec

        options: dict = {"skip_instance_cache": True} if fresh else {}
        s3 = self.protocol in ("s3", "s3a")
        if s3:
            options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60}
        fs = fsspec.filesystem(self.protocol, **options)
        if s3:
            fs.retries = 1  # s3fs's own loop (a class attribute, not an argument)
        return fs

    def _reconnect(self) -> None:
        """A fresh filesystem object after a failure: a dropped connection pool is not reused."""
        self.fs = self._filesystem(fresh=True)

    def read_bytes(self, rel: str, what: str = "read") -> bytes | bytearray:
        """The whole object `rel` (one request); `what` names the act in an error ("download")."""
        if self.protocol in ("s3", "s3a"):
            return self._call(rel, what, lambda: self._signed_get(rel))
        return self._call(rel, what, lambda: self.fs.cat_file(self._path(rel)))

    def _signed_get(self, rel: str) -> bytes | bytearray:
        """An S3 object by a GET of its presigned URL (boto signs it with the user's credentials and endpoint),
        its body read straight into one buffer of its Content-Length. s3fs's cat_file gathers a body in
        aiohttp's small chunks and joins them: 0.83 CPU-s per 403 MB on a 2-core machine, against 0.39 this
        way, time that a loader on few cores spends decoding instead."""
        url = self.fs.sign(self._path(rel), expiration=3600)
        bundle = os.environ.get("AWS_CA_BUNDLE")  # as boto honours it
        context = ssl.create_default_context(cafile=bundle) if bundle and url.startswith("https:") else None
        try:
            with urllib.request.urlopen(url, timeout=60, context=context) as response:
                size = int(response.headers.get("Content-Length", -1))
                if size < 0:
                    return bytearray(response.read())
                body, got = bytearray(size), 0
                view = memoryview(body)
                while got < size:
                    n = response.readinto(view[got:])
                    if not n:
                        raise ConnectionError(f"the connection closed after {got:,} of {size:,} bytes")
                    got += n
                return body
        except urllib.error.HTTPError as e:
            error = _http_error(e)
            if error is None:
                return self.fs.cat_file(self._path(rel))
            raise error from None

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self._path(rel))
        return bool(self._call(rel, "look up", lambda: self.fs.exists(self._path(rel))))

    def stamps(self, rel: str) -> dict[str, tuple[int, str]]:
        """{name: (size, tag)} of the objects directly under `rel`, from one listing: the tag is the store's
        ETag (or generation, or modification time for file://), which changes whenever an object is replaced."""
        def listing():
            try:  # refresh: fsspec keeps listings, and an object replaced since must show its new ETag
                return self.fs.ls(self._path(rel), detail=True, refresh=True)
            except FileNotFoundError:
                return []
        out = {}
        for info in self._call(rel, "list", listing):
            if info.get("type", "file") == "file":
                name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
                out[name] = (int(info.get("size") or 0), stamp_tag(info))
        return out

    def upload(self, src: Path, rel: str) -> None:
        """The local file `src` as object `rel` (replacing it)."""
        self._call(rel, "upload", lambda: self.fs.put_file(str(src), self._path(rel)))

    def delete(self, rel: str) -> None:
        def remove():
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass  # already gone: what was asked
        self._call(rel, "delete", remove)

    def check(self) -> None:
        """A set-up problem (no credentials, no bucket) named now, before any work: list the location's bucket
        (its first component) once; the location itself need not exist yet."""
        bucket = self._path("").split("/", 1)[0] or "/"
        self._call("", "reach the bucket of", lambda: self.fs.ls(bucket, detail=False))


_stores: dict[tuple[int, str], Store] = {}
_timeout = [120.0]  # the process's retry time: the command's --storage-timeout (configure)


def configure(timeout: float) -> None:
    """Set the retry time of every store this process reaches (a command's --storage-timeout)."""
    _timeout[0] = timeout
    for s in _stores.values():
        s.timeout = timeout


def store(url: str) -> Store:
    """The Store of `url` in this process (one per URL, made anew in a forked child)."""
    key = (os.getpid(), str(url).rstrip("/"))
    if key not in _stores:
        _stores[key] = Store(key[1], _timeout[0])
    return _stores[key]


def read_bytes(where) -> bytes | bytearray:
    """The bytes of a local file or of one object named by its URL (FileNotFoundError for a missing local
    file; a missing object is a StoreError)."""
    if not is_url(where):
        return Path(where).read_bytes()
    parent, name = str(where).rsplit("/", 1)
    return store(parent).read_bytes(name)


def stamp_tag(info: dict) -> str:
    """What identifies one version of an object in fsspec's `info`: its ETag, generation, or modification time."""
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified"):
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


def default_cache_root() -> Path:
    """~/.cache/alexnet-pipeline (XDG_CACHE_HOME honoured): the stat caches of read-only copies, node caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet-pipeline"


UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
         "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 500M, 40G, 1.5T or 123456 (K, M, G, T are powers of 1,024); ValueError if not one."""
    t = str(text).strip().upper().replace(" ", "")
    number = t.rstrip("BKMGTI")
    unit = t[len(number):]
    if unit not in UNITS or not number:
        raise ValueError(f"not a size: {text!r}")
    value = float(number) * UNITS[unit]
    if not value >= 1:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def size_problem(text) -> str | None:
    """An option check: None for None or a size parse_size reads, else the problem."""
    if text is None:
        return None
    try:
        parse_size(text)
    except ValueError:
        return "must be a size such as 500M, 40G or 1.5T"
    return None


def human(n: float) -> str:
    """Bytes for a message: 1.5 GiB, 300 MiB, 12 KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
