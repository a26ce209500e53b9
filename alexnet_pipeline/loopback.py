"""An S3 store on this machine, for the tests and `alexnet-bench storage`: moto's S3 server (`moto[server]`)
in a subprocess on 127.0.0.1, behind a small HTTP proxy that adds a delay to every request (a real object
store answers in 10-50 ms), counts the requests per object, and can go down (closing every connection
unanswered) and come back. Nothing here reaches beyond the machine.

    with Loopback(latency=0.02) as s3:       # s3.env: AWS_ENDPOINT_URL and test credentials
        s3.make_bucket("data")
        ... s3.gets("data/prefix/train/train-000000.tar") ...
        s3.down = True                       # the store is gone until s3.down = False

`python -m alexnet_pipeline.loopback proxy --upstream PORT --latency-ms 20` runs the proxy alone (the
benchmark runs it in its own process, so that it takes no time from the loader it times).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen | None, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class Proxy(http.server.ThreadingHTTPServer):
    """HTTP proxy to 127.0.0.1:upstream: `latency` seconds before each request is forwarded; `requests`
    counts (method, path) of each request and `log` lists them in order; with `down` set, connections are
    closed unanswered."""

    daemon_threads = True

    def __init__(self, upstream: int, latency: float = 0.0, port: int = 0):
        self.upstream, self.latency, self.down = upstream, latency, False
        self.requests: collections.Counter = collections.Counter()
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, format, *args):  # noqa: A002 (http.server's name)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)
                raw += chunk
                if size == 0:
                    while chunk not in (b"\r\n", b""):  # trailers, then the blank line
                        chunk = self.rfile.readline()
                        raw += chunk
                    return raw
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        if self.server.down:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        time.sleep(self.server.latency)
        with self.server.lock:
            request = (self.command, urllib.parse.urlsplit(self.path).path)
            self.server.requests[request] += 1
            self.server.log.append(request)
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
        try:
            upstream.request(self.command, self.path, body=body, headers=headers, encode_chunked=False)
            response = upstream.getresponse()
            data = response.read()
        except OSError as e:  # the server stopped (a bench's end, DALI's late reads): a gateway's answer
            self.send_error(502, f"upstream: {e}")
            return
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        head = self.command == "HEAD"  # its Content-Length is the object's, with no body
        for k, v in response.getheaders():
            if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                self.send_header(k, v)
        if head:  # as moto's server does: a client that asked HEAD as a custom method reads until the close
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class Loopback:
    """moto's S3 server in a subprocess and the proxy in front of it (in this process, or with
    `proxy_process` in another); `env` holds what a client needs (endpoint and test credentials). `nice`: the
    subprocesses' scheduling priority (a benchmark's 19 leaves the cores to the loader it times, as a store on
    other machines would, and lets serving take what the loader leaves idle)."""

    def __init__(self, latency: float = 0.0, proxy_process: bool = False, nice: int = 0):
        self.latency, self.proxy_process, self.nice = latency, proxy_process, nice
        self._procs: list[subprocess.Popen] = []
        self.proxy: Proxy | None = None

    def __enter__(self) -> "Loopback":
        self.moto_port = moto_port = free_port()
        self._procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(moto_port, self._procs[-1])
        if self.proxy_process:
            port = free_port()
            self._procs.append(subprocess.Popen([sys.executable, "-m", "alexnet_pipeline.loopback", "proxy",
                                                 "--upstream", str(moto_port), "--port", str(port),
                                                 "--latency-ms", str(self.latency * 1000)]))
            _wait_for(port, self._procs[-1])
        else:
            self.proxy = Proxy(moto_port, self.latency)
            threading.Thread(target=self.proxy.serve_forever, daemon=True, name="s3-proxy").start()
            port = self.proxy.port
        for proc in self._procs:
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.nice)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        return self

    def __exit__(self, *exc) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        for proc in self._procs:
            proc.terminate()
            proc.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """CPU seconds the server's and proxy's processes have used so far (Linux /proc; the in-process proxy's
        are this process's): a benchmark on this machine says what serving took from the cores it measures."""
        total = 0.0
        for proc in self._procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return total

    def make_bucket(self, name: str) -> None:
        """Create a bucket (through the proxy, without the delay)."""
        connection = http.client.HTTPConnection(self.endpoint.split("//")[1], timeout=30)
        connection.request("PUT", f"/{name}")
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status >= 300:
            raise RuntimeError(f"could not create bucket {name}: {response.status}")

    @property
    def down(self) -> bool:
        return self.proxy is not None and self.proxy.down

    @down.setter
    def down(self, value: bool) -> None:
        assert self.proxy is not None, "the in-process proxy can go down, not one in another process"
        self.proxy.down = value

    def gets(self, key: str) -> int:
        """GET requests of object `key` ("bucket/path") so far (through the in-process proxy)."""
        assert self.proxy is not None
        return self.proxy.requests[("GET", f"/{key}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet_pipeline.loopback", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    proxy = sub.add_parser("proxy", help="the delaying proxy alone, in front of an S3 server on this machine")
    proxy.add_argument("--upstream", type=int, required=True)
    proxy.add_argument("--port", type=int, default=0)
    proxy.add_argument("--latency-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    server = Proxy(a.upstream, a.latency_ms / 1000, a.port)
    print(f"proxy on 127.0.0.1:{server.port} -> 127.0.0.1:{a.upstream}, {a.latency_ms:g} ms per request",
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
