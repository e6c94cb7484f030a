"""matchlock's own Python SDK (PyPI `matchlock`) driving `airlock rpc` unchanged.

Run with MATCHLOCK_BIN pointing at the airlock binary and AIRLOCK_TEST_IMAGE naming a stored
busybox image (crates/airlock/tests/sdk.rs does both). Plain asserts; exits non-zero on failure.
"""

import io
import os
import sys
import threading
import time

from matchlock import Client, RPCError
from matchlock.types import CreateOptions, HostIPMapping, MountConfig, Secret

IMAGE = os.environ.get("AIRLOCK_TEST_IMAGE", "demo/busybox:latest")
SECRET = "sk-matchlock-compat-93be51"


def main() -> None:
    with Client() as c:
        vm = c.create(
            CreateOptions(
                image=IMAGE,
                cpus=1,
                memory_mb=256,
                disk_size_mb=512,
                env={"GREETING": "hello"},
                allowed_hosts=["api.example.com"],
                secrets=[Secret(name="API_KEY", value=SECRET, hosts=["api.example.com"])],
                block_private_ips=True,
                block_private_ips_set=True,
            )
        )
        assert len(vm) == 12, vm

        # exec: create-time env, working dir, exit code, both streams.
        r = c.exec("echo $GREETING; pwd; echo err >&2; exit 3", working_dir="/tmp")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "hello\n/tmp\n", "err\n"), r
        assert r.duration_ms >= 0

        # exec_stream: output arrives as it is produced.
        out, err = io.StringIO(), io.StringIO()
        r = c.exec_stream("for i in 1 2 3; do echo $i; done; echo e >&2", stdout=out, stderr=err)
        assert r.exit_code == 0 and out.getvalue() == "1\n2\n3\n" and err.getvalue() == "e\n", (
            out.getvalue(),
            err.getvalue(),
        )

        # exec_pipe: stdin in, stdout/stderr out, as a user.
        out, err = io.StringIO(), io.StringIO()
        r = c.exec_pipe(
            "tr a-z A-Z; id -u >&2",
            stdin=io.BytesIO(b"piped input\n"),
            stdout=out,
            stderr=err,
            user="nobody",
        )
        assert r.exit_code == 0 and out.getvalue() == "PIPED INPUT\n", out.getvalue()
        assert err.getvalue() == "65534\n", err.getvalue()

        # exec_tty (exec_interactive): a real terminal with the requested size.
        out = io.StringIO()
        r = c.exec_interactive("stty size; tty", stdout=out, rows=33, cols=101)
        assert r.exit_code == 0, r
        assert "33 101" in out.getvalue() and "/dev/pts/" in out.getvalue(), out.getvalue()

        # Files.
        blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
        c.write_file("/work/sub/blob.bin", blob, mode=0o600)
        assert c.read_file("/work/sub/blob.bin") == blob
        c.write_file("/work/sub/hello.txt", "hi\n")
        files = {f.name: f for f in c.list_files("/work/sub")}
        assert set(files) == {"blob.bin", "hello.txt"}, files
        assert files["blob.bin"].size == len(blob) and not files["blob.bin"].is_dir
        assert files["blob.bin"].mode & 0o777 == 0o600
        assert c.list_files("/work")[0].is_dir
        assert c.exec("cat /work/sub/hello.txt").stdout == "hi\n"
        for call in (lambda: c.read_file("/nope"), lambda: c.list_files("/nope")):
            try:
                call()
                raise AssertionError("expected a file error")
            except RPCError as e:
                assert e.is_file_error(), e

        # cancel: a timed-out request is cancelled and its process killed.
        t0 = time.monotonic()
        try:
            c.exec("sleep 30; echo never", timeout=1.0)
            raise AssertionError("expected a timeout")
        except TimeoutError:
            pass
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 10
        while "sleep 30" in c.exec("ps").stdout:
            assert time.monotonic() < deadline, "cancelled command still runs"
            time.sleep(0.2)

        # Concurrent requests on one client.
        results = {}

        def run(i: int) -> None:
            results[i] = c.exec(f"echo {i}").stdout

        ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert results == {i: f"{i}\n" for i in range(4)}, results

        # port_forward reaches a guest server; allow-list changes reach the policy.
        c.exec("mkdir -p /www && echo served > /www/i && httpd -p 8000 -h /www")
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        c.port_forward("%d:8000" % port)
        import urllib.request
        assert urllib.request.urlopen("http://127.0.0.1:%d/i" % port, timeout=20).read() == b"served\n"
        c._send_request("allow_list_add", {"hosts": ["example.org"]})
        c._send_request("allow_list_delete", {"hosts": ["example.org"]})
        try:
            c._send_request("allow_list_add", {"hosts": ["not a host"]})
            raise AssertionError("a bad rule must be refused")
        except RPCError as e:
            assert e.code == RPCError.INVALID_PARAMS, e
        c.close()
    c.remove()  # `airlock rm ID`: nothing left to remove for an rpc sandbox, and no error

    # no_network; host_fs mounts are workspace shares; memory mounts are refused clearly.
    with Client() as c:
        c.create(CreateOptions(image=IMAGE, no_network=True))
        assert c.exec("echo ok").stdout == "ok\n"
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "hello.txt"), "w") as f:
            f.write("from the host\n")
        with Client() as c:
            c.create(CreateOptions(image=IMAGE, mounts={"/workspace": MountConfig(type="host_fs", host_path=d)}))
            assert c.exec("cat /workspace/hello.txt").stdout == "from the host\n"
            c.exec("echo from the guest > /workspace/back.txt")
        with open(os.path.join(d, "back.txt")) as f:
            assert f.read() == "from the guest\n"
    with Client() as c:
        try:
            c.create(
                CreateOptions(image=IMAGE, mounts={"/workspace": MountConfig(type="memory")})
            )
            raise AssertionError("memory mounts are not supported")
        except RPCError as e:
            assert "not supported" in e.message, e
        # A failed create leaves a usable connection; errors keep matchlock's codes.
        try:
            c.exec("true")
            raise AssertionError("exec without a sandbox")
        except RPCError as e:
            assert e.is_vm_error(), e
    plain_http_secret_is_refused()
    print("matchlock compat: ok")


def plain_http_secret_is_refused() -> None:
    """A secret's placeholder over plain HTTP, even to its own host, gets a 403 naming
    --secret-allow-http and never reaches the server (matchlock's SDK has no such option, so
    through it the secret is HTTPS-only)."""
    import http.server

    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"reached\n")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with Client() as c:
            c.create(
                CreateOptions(
                    image=IMAGE,
                    allowed_hosts=["api.example.com"],
                    add_hosts=[HostIPMapping(host="api.example.com", ip="127.0.0.1")],
                    secrets=[Secret(name="API_KEY", value=SECRET, hosts=["api.example.com"])],
                )
            )
            base = "http://api.example.com:%d" % port
            # Without the placeholder the host is reachable over plain HTTP...
            r = c.exec("wget -q -O- %s/open" % base)
            assert r.exit_code == 0 and r.stdout == "reached\n", r
            # ...with it, refused by Airlock before anything is sent.
            r = c.exec(
                'wget -S -O- --header "Authorization: Bearer $API_KEY" %s/secret 2>&1' % base
            )
            assert r.exit_code != 0 and "403" in r.stdout, r
            assert seen == ["/open"], seen
            assert SECRET not in r.stdout
    finally:
        srv.shutdown()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
