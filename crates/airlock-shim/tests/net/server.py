"""Test upstream for the shim's network tests: HTTP on one port, HTTPS (test CA) on another,
both on 127.0.0.1. Every request's line and headers are appended to LOG, so a test can prove
what arrived. Prints the two ports, then serves until killed.
Usage: server.py CERT KEY LOG"""
import http.server, ssl, sys, threading

cert, key, log = sys.argv[1:4]
lock = threading.Lock()

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock, open(log, "a") as f:
            f.write(f"{self.server.server_port} {self.requestline}\n{self.headers}\n")
        body = b"hello from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
print(plain.server_port, tls.server_port, flush=True)
threading.Thread(target=plain.serve_forever, daemon=True).start()
tls.serve_forever()
