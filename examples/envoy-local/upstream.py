#!/usr/bin/env python3
"""The tiny upstream: answers every request with what it received (method, path and the
identity headers meshauthz set), as JSON. Listens on 127.0.0.1:8080."""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def answer(self):
        body = json.dumps({
            "method": self.command,
            "path": self.path,
            "x-meshauthz-peer": self.headers.get("x-meshauthz-peer"),
            "x-jwt-sub": self.headers.get("x-jwt-sub"),
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = answer

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", 8080), Echo).serve_forever()
