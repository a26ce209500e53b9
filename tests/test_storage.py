"""Stores through fsspec (storage.py), against an S3 server on this machine: reads, listings, uploads; a set-up
problem named at once; a store down for a while retried, one gone for good named after the retry time."""

import errno
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from alexnet_pipeline import storage


def test_a_store_reads_lists_and_uploads_and_an_object_replaced_gets_a_new_stamp(s3, tmp_path):
    store = storage.Store(s3.url("data"))
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    store.upload(src, "sub/a.bin")
    assert store.read_bytes("sub/a.bin") == b"x" * 1000
    (size, tag), = store.stamps("sub").values()
    assert size == 1000 and tag == hashlib.md5(b"x" * 1000).hexdigest()  # S3's ETag of one part, unquoted
    src.write_bytes(b"y" * 1000)
    store.upload(src, "sub/a.bin")
    assert store.stamps("sub") == {"a.bin": (1000, store.stamps("sub")["a.bin"][1])} and \
        store.stamps("sub")["a.bin"][1] != tag  # same size, another ETag
    # replaced by another client (another node's prep): the listing is asked again, never remembered
    before = store.stamps("sub")["a.bin"][1]
    other = type(s3.fs())(skip_instance_cache=True)
    other.pipe(f"{s3.bucket}/data/sub/a.bin", b"z" * 1000)
    assert store.stamps("sub")["a.bin"][1] != before
    assert store.stamps("nothing-here") == {}
    store.delete("sub/a.bin")
    assert not store.exists("sub/a.bin")


def test_a_missing_object_or_bucket_is_one_line_at_once(s3):
    t0 = time.monotonic()
    with pytest.raises(storage.StoreError, match=r"s3://no-such-bucket/x/dataset.json: cannot read"):
        storage.Store("s3://no-such-bucket/x", timeout=30).read_bytes("dataset.json")
    with pytest.raises(storage.StoreError, match="reach the bucket"):
        storage.Store("s3://no-such-bucket/x", timeout=30).check()
    assert time.monotonic() - t0 < 10  # not retried for the 30 s a failing store gets


def test_a_local_store_stamps_a_replaced_file_of_the_same_size_anew(tmp_path):
    store = storage.Store(f"file://{tmp_path}")
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    os.utime(tmp_path / "a.bin", (1_000_000, 1_000_000))
    (size, tag), = store.stamps("").values()
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    assert size == 100 and tag and store.stamps("")["a.bin"] == (100, store.stamps("")["a.bin"][1]) and \
        store.stamps("")["a.bin"][1] != tag


def test_an_s3_object_is_one_signed_get_read_whole(s3):
    data = os.urandom(3 * 2**20 + 17)
    s3.fs().pipe(f"{s3.bucket}/big.bin", data)
    assert storage.Store(s3.url()).read_bytes("big.bin") == data
    assert s3.gets("big.bin") == 1


class _Scripted(http.server.ThreadingHTTPServer):
    """An HTTP server on this machine answering each GET with the next of `answers`: (status, body, the
    Content-Length it claims)."""

    def __init__(self, answers: list[tuple[int, bytes, int]]):
        self.answers, self.asked = answers, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 (the server is self)
                status, body, length = self.answers[self.asked]
                self.asked += 1
                handler.send_response(status)
                handler.send_header("Content-Length", str(length))
                handler.send_header("Connection", "close")
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def store(self, monkeypatch) -> storage.Store:
        """An s3:// Store whose signed URLs all point here."""
        store = storage.Store("s3://bucket/prefix", timeout=30)
        monkeypatch.setattr(store.fs, "sign", lambda path, expiration: f"http://127.0.0.1:{self.server_port}/o")
        monkeypatch.setattr(storage.Store, "_reconnect", lambda store: None)  # keeps the patched signer
        monkeypatch.setattr(storage, "RETRY_FIRST", 0.01)
        return store


def test_a_body_cut_short_is_retried_and_never_returned_short(s3, monkeypatch):
    full = os.urandom(1000)
    server = _Scripted([(200, full[:400], 1000), (503, b"<Code>SlowDown</Code>", 21), (200, full, 1000)])
    assert server.store(monkeypatch).read_bytes("o") == full
    assert server.asked == 3
    server.shutdown()


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_store_that_is_slow_throttles_or_fails_is_retried(s3, monkeypatch, status):
    body = b"<Error><Code>SlowDown</Code></Error>"
    server = _Scripted([(status, body, len(body)), (200, b"payload", 7)])
    assert server.store(monkeypatch).read_bytes("o") == b"payload" and server.asked == 2
    server.shutdown()


def test_a_missing_s3_object_is_one_line_at_once(s3, monkeypatch):
    body = b"<Error><Code>NoSuchKey</Code></Error>"
    server = _Scripted([(404, body, len(body))] * 3)
    with pytest.raises(storage.StoreError, match=r"^s3://bucket/prefix/o: cannot download: HTTP 404 .*"
                                                 r"\(NoSuchKey\) \(no such object or bucket\)$"):
        server.store(monkeypatch).read_bytes("o", "download")
    assert server.asked == 1  # not retried
    server.shutdown()


@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (400, "AuthorizationHeaderMalformed"),
                                         (301, "PermanentRedirect")])
def test_any_other_s3_answer_is_asked_again_through_s3fs(s3, monkeypatch, status, code):
    """A refusal is named in botocore's words, once; a bucket in another region than the one signed for is
    read through s3fs, whose botocore follows the redirect."""
    body = f"<Error><Code>{code}</Code></Error>".encode()
    server = _Scripted([(status, body, len(body))] * 4)
    store, asked = server.store(monkeypatch), []

    def cat_file(path):
        asked.append(path)
        if status == 301:
            return b"payload"
        raise PermissionError("Access Denied")

    monkeypatch.setattr(store.fs, "cat_file", cat_file)
    if status == 301:
        assert store.read_bytes("o") == b"payload"
    else:
        with pytest.raises(storage.StoreError, match=r"^s3://bucket/prefix/o: cannot download: Access Denied$"):
            store.read_bytes("o", "download")
    assert server.asked == 1 and asked == ["bucket/prefix/o"]
    server.shutdown()


def test_the_check_asks_for_the_bucket_so_a_location_not_written_yet_passes(s3):
    storage.Store(s3.url("new", "prefix"), timeout=30).check()  # prep's new output: nothing under it yet
    assert not storage.Store(s3.url("new"), timeout=30).exists("prefix")


def test_a_store_down_for_a_while_is_retried_until_it_is_back(s3):
    store = storage.Store(s3.url(), timeout=30)
    s3.fs().pipe(f"{s3.bucket}/obj", b"payload")
    s3.loopback.down = True
    threading.Timer(1.5, lambda: setattr(s3.loopback, "down", False)).start()
    t0 = time.monotonic()
    assert store.read_bytes("obj") == b"payload"
    assert time.monotonic() - t0 >= 1.4


def _bare_store(monkeypatch, fs=None) -> tuple[storage.Store, list[float]]:
    """A Store of `fs` (no network) whose waits are recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    monkeypatch.setattr(storage.Store, "_reconnect", lambda self: None)
    store = storage.Store.__new__(storage.Store)
    store.url, store.timeout, store.fs = "s3://b/p", 40.0, fs
    return store, slept


def test_the_waits_between_tries_double_up_to_the_most_within_the_retry_time(monkeypatch):
    def failing():
        raise ConnectionError("refused")

    store, slept = _bare_store(monkeypatch)  # no filesystem: _call alone
    monkeypatch.setattr(storage.time, "monotonic", lambda: sum(slept))  # a clock that moves only by the waits
    with pytest.raises(storage.StoreGone, match="gave up after retrying for 40 s"):
        store._call("x", "read", failing)
    assert slept == [0.5, 1, 2, 4, 8, 10, 10, 4.5]  # doubling from RETRY_FIRST, at most RETRY_MAX, to the deadline


def test_one_store_per_location_with_the_commands_retry_time(monkeypatch):
    monkeypatch.setattr(storage, "_stores", {})
    monkeypatch.setattr(storage, "_timeout", [120.0])
    storage.configure(7)
    a = storage.store("file:///tmp/somewhere/")
    assert a is storage.store("file:///tmp/somewhere") and a.timeout == 7
    assert storage.location("s3://bucket/prefix/") == "s3://bucket/prefix"


def test_an_index_url_is_its_shards_with_the_index_suffix():
    assert storage.with_suffix("s3://bucket/data/train/train-000001.tar", ".idx") == \
        "s3://bucket/data/train/train-000001.idx"
    assert storage.join("s3://bucket/data/", "train", "a.tar") == "s3://bucket/data/train/a.tar"


def test_a_store_gone_for_good_is_named_after_the_retry_time(s3):
    store = storage.Store(s3.url(), timeout=2)
    s3.loopback.down = True
    t0 = time.monotonic()
    with pytest.raises(storage.StoreGone, match=rf"{s3.url('obj')}: cannot read \(.*\); gave up after retrying "
                                                r"for 2 s \(--storage-timeout\)"):
        store.read_bytes("obj")
    assert 1.5 < time.monotonic() - t0 < 20


def test_missing_credentials_are_one_line_before_any_work(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3.loopback.endpoint, HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    r = subprocess.run([sys.executable, "-m", "alexnet_pipeline", "train", "--shards", s3.url("data"), "--out",
                        str(tmp_path / "run"), "--device", "cpu"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alexnet-train: error: {s3.url('data', 'dataset.json')}") and \
        "credentials" in lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("text,size", [("500M", 500 * 2**20), ("40G", 40 * 2**30), ("1.5T", int(1.5 * 2**40)),
                                       ("123456", 123456), ("2 GiB", 2 * 2**30), ("1", 1)])
def test_sizes_read_as_users_write_them(text, size):
    assert storage.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "12X", "0"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        storage.parse_size(text)
    assert storage.size_problem(text)


@pytest.mark.parametrize("n,text", [(1023, "1023 B"), (2**10, "1.0 KiB"), (2**30, "1.0 GiB"),
                                    (3 * 2**29, "1.5 GiB"), (2**40, "1.0 TiB")])
def test_sizes_print_in_the_largest_unit_they_fill(n, text):
    assert storage.human(n) == text


class ClientOSError(OSError):
    """fsspec's stores raise their own OSError subclasses (aiohttp's, say)."""


@pytest.mark.parametrize("error", [ClientOSError(code, os.strerror(code)) for code in (errno.EACCES, errno.EPERM,
                                                                                       errno.ENOENT)]
                         + [ValueError("Invalid bucket name 'B_1'"), ImportError("Install s3fs to access S3"),
                            IsADirectoryError("x"), NotADirectoryError("x")])
def test_a_set_up_problem_is_one_line_at_once_not_retried(monkeypatch, error):
    """No retry cures a refusal raised as any kind of OSError carrying EACCES, EPERM or ENOENT, a malformed
    bucket name (fsspec's ValueError), a protocol whose package is missing (ImportError) or a path that is a
    directory: each is named at once, not retried until StoreGone."""
    store, slept = _bare_store(monkeypatch)
    tries = []

    def failing():
        tries.append(1)
        raise error

    said = getattr(error, "strerror", None) or str(error)
    with pytest.raises(storage.StoreError, match=rf"^s3://b/p/x: cannot read: .*{re.escape(said)}"):
        store._call("x", "read", failing)
    assert tries == [1] and slept == []


def test_a_delete_that_fails_for_a_while_is_tried_again_and_one_already_gone_is_done(monkeypatch):
    class Fs:
        def __init__(self):
            self.removed: list[str] = []
            self.fail = 1

        @staticmethod
        def _strip_protocol(url):
            return url.split("://", 1)[1]

        def rm_file(self, path):
            self.removed.append(path)
            if self.fail:
                self.fail -= 1
                raise ConnectionError("connection reset")
            if len(self.removed) > 2:
                raise FileNotFoundError(path)

    fs = Fs()
    store, slept = _bare_store(monkeypatch, fs)
    store.delete("dataset.json")
    assert fs.removed == ["b/p/dataset.json"] * 2 and slept == [storage.RETRY_FIRST]
    store.delete("dataset.json")  # no such object now: what was asked
    assert len(fs.removed) == 3 and slept == [storage.RETRY_FIRST]


def test_a_listing_stamps_the_objects_directly_under_it_not_its_folders(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "dataset.json").write_text("{}")
    (tmp_path / "data" / "train" / "a.tar").write_bytes(b"x" * 3)
    store = storage.Store(f"file://{tmp_path}", timeout=5)
    assert set(store.stamps("data")) == {"dataset.json"}
    assert store.stamps("data/train")["a.tar"][0] == 3


def test_the_commands_retry_time_reaches_the_stores_already_made(monkeypatch):
    monkeypatch.setattr(storage, "_stores", {})
    monkeypatch.setattr(storage, "_timeout", [120.0])
    made = storage.store("file:///tmp/elsewhere")
    storage.configure(9)
    assert made.timeout == 9 and storage.store("file:///tmp/another").timeout == 9


def test_the_cache_root_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert storage.default_cache_root() == tmp_path / "xdg" / "alexnet-pipeline"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.default_cache_root() == tmp_path / "home" / ".cache" / "alexnet-pipeline"
