"""The benchmarks' and tests' store on this machine: moto's S3 server behind the delaying proxy."""

import http.client
import http.server
import threading
import time

from alexnet_pipeline.loopback import Loopback, Proxy


def _timed(endpoint: str, method: str, path: str, **request) -> tuple[float, int, bytes]:
    connection = http.client.HTTPConnection(endpoint.split("//")[1], timeout=10)
    t0 = time.monotonic()
    connection.request(method, path, **request)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return time.monotonic() - t0, response.status, body


def test_the_proxy_in_its_own_process_delays_each_request_by_its_milliseconds():
    """`--latency-ms 250` is a quarter of a second per request, not 250 s."""
    with Loopback(latency=0.25, proxy_process=True) as s3:
        s3.make_bucket("delayed")
        for key in ("one", "two"):
            took, status, answer = _timed(s3.endpoint, "PUT", f"/delayed/{key}", body=b"abcd")
            assert status == 200 and 0.25 <= took < 5, (status, answer)


class _Unchunk(http.server.BaseHTTPRequestHandler):
    """An upstream that answers a chunked PUT with the body it decoded."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (http.server's name)
        pass

    def do_PUT(self):
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            body += self.rfile.read(size)
            self.rfile.readline()  # the chunk's CRLF (after the last, empty one: the blank line)
            if size == 0:
                break
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_proxy_passes_a_chunked_body_whole():
    """A chunked upload (as a client sends a body of unknown length) is read to the end of every chunk and
    forwarded whole."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unchunk)
    proxy = Proxy(upstream.server_address[1])
    for server in (upstream, proxy):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        parts = [b"first chunk ", b"x" * 5000, b" last"]
        _, status, body = _timed(f"http://127.0.0.1:{proxy.port}", "PUT", "/b/key", body=iter(parts),
                                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        assert status == 200 and body == b"".join(parts)
    finally:
        for server in (proxy, upstream):
            server.shutdown()
            server.server_close()
