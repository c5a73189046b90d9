#!/usr/bin/env python3
"""A small HTTP(S) server for provision's download tests: serves files from a directory and,
when the query string asks, misbehaves the way real servers and networks do.

  ?drop=N     close the connection after N body bytes of a full (non-range) response
  ?dropfirst=N  the same, on the first full GET of the path only (a server that fails once)
  ?stall=N    send N body bytes of a full response, then nothing (the client must time out)
  ?ranges=0   no Accept-Ranges, and Range requests get the whole body (200)
  ?validators=0  no ETag and no Last-Modified
  ?extra=N    announce a Content-Length N bytes larger than the file (a lying server)
  ?rate=N     send the body at about N bytes a second (a slow link)

Prints "PORT <n>" when listening on 127.0.0.1; every request is logged to stdout as
"REQ <method> <path> <range or ->". With --tls CERT KEY it speaks HTTPS.
"""
import http.server
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = "."
    dropped_once = set()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(head=True)

    def do_GET(self):
        self.serve(head=False)

    def serve(self, head):
        url = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        rng = self.headers.get("Range")
        print(f"REQ {self.command} {url.path} {rng or '-'}", flush=True)
        path = os.path.join(self.root, url.path.lstrip("/"))
        # deny=SUFFIX: 403 for paths ending so, as an object store answers a presigned URL's
        # query on any other path, or a key it will not say is missing.
        if q.get("deny") and url.path.endswith(q["deny"]):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(path)
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        ranges = q.get("ranges", "1") != "0"
        validators = q.get("validators", "1") != "0"
        start = 0
        if rng and ranges and rng.startswith("bytes=") and rng.endswith("-"):
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range == etag or if_range == self.date_time_string(st.st_mtime):
                start = int(rng[len("bytes="):-1])
        status = 206 if start > 0 else 200
        self.send_response(status)
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        if validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", self.date_time_string(st.st_mtime))
        length = size - start + (int(q.get("extra", "0")) if start == 0 else 0)
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        drop = int(q["drop"]) if "drop" in q and start == 0 else None
        if "dropfirst" in q and start == 0:
            with Handler.lock:
                if url.path not in Handler.dropped_once:
                    Handler.dropped_once.add(url.path)
                    drop = int(q["dropfirst"])
        stall = int(q["stall"]) if "stall" in q and start == 0 else None
        rate = int(q["rate"]) if "rate" in q else None
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while True:
                chunk = f.read(64 << 10)
                if not chunk:
                    break
                for limit in (drop, stall):
                    if limit is not None and sent + len(chunk) > limit:
                        chunk = chunk[: max(0, limit - sent)]
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
                if drop is not None and sent >= drop:
                    self.close_abruptly()
                    return
                if stall is not None and sent >= stall:
                    time.sleep(30)
                    return
        if int(q.get("extra", "0")) and start == 0:
            self.close_abruptly()

    def close_abruptly(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    Handler.root = sys.argv[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if len(sys.argv) >= 5 and sys.argv[2] == "--tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"PORT {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Ends when the test closes our stdin (or dies).
    sys.stdin.read()


if __name__ == "__main__":
    main()
