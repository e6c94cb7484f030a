"""Airlock's Python SDK against real sandboxes (sync, asyncio, and attach to `run -d`).

Needs AIRLOCK_BIN and AIRLOCK_TEST_IMAGE (crates/airlock/tests/sdk.rs sets both)."""

import asyncio
import os
import subprocess
import sys

from airlock_sdk import AirlockError, AsyncSandbox, Sandbox, SecretSpec

IMAGE = os.environ.get("AIRLOCK_TEST_IMAGE", "demo/busybox:latest")
BIN = os.environ.get("AIRLOCK_BIN", "airlock")


def expect_error(fn, code, text=""):
    try:
        fn()
    except AirlockError as e:
        assert e.code == code and text in e.message, e
        return
    raise AssertionError("expected an error")


def sync_suite() -> None:
    with Sandbox.create(IMAGE, env={"A": "1"}, allow_hosts=["example.com"],
                        secrets=[SecretSpec("TOKEN", "v", ["example.com"])]) as sb:
        r = sb.exec(["sh", "-c", "echo $A $B; echo e >&2; exit 4"], env={"B": "2"})
        assert (r.exit_code, r.stdout, r.stderr) == (4, b"1 2\n", b"e\n"), r
        assert sb.exec("cat", stdin=b"in\n").stdout == b"in\n"
        assert sb.exec("pwd", cwd="/srv").stdout == b"/srv\n"
        assert sb.exec("id -u", user="nobody").stdout == b"65534\n"
        expect_error(lambda: sb.exec(["/no/such"]), AirlockError.EXEC_FAILED, "not found")
        # Streaming with stdin.
        p = sb.spawn(["sh", "-c", "while read l; do echo got:$l; echo err:$l >&2; done"])
        p.write(b"one\ntwo\n")
        p.close_stdin()
        seen = {"stdout": b"", "stderr": b""}
        for kind, data in p.output():
            seen[kind] += data
        assert p.wait() == 0
        assert seen == {"stdout": b"got:one\ngot:two\n", "stderr": b"err:one\nerr:two\n"}, seen
        # Terminal and signals.
        p = sb.spawn("stty size; sleep 30", tty=(40, 120))
        first = b""
        for _, data in p.output():
            first += data
            if b"\n" in first:
                break
        assert b"40 120" in first, first
        p.signal(9)
        assert p.wait() == 128 + 9
        # Files, including one larger than a request chunk.
        big = os.urandom(9 * 1024 * 1024)
        sb.write_file("/data/big.bin", big, mode=0o640)
        assert sb.read_file("/data/big.bin") == big
        sb.write_file("/data/empty", b"")
        assert sb.read_file("/data/empty") == b""
        names = {f.name: f for f in sb.list_files("/data")}
        assert names["big.bin"].size == len(big) and names["big.bin"].mode & 0o777 == 0o640
        expect_error(lambda: sb.read_file("/missing"), AirlockError.FILE_FAILED, "/missing")
        # Port forwards reach a guest server; allow-list changes reach the policy.
        sb.exec("mkdir -p /www && echo served > /www/i && httpd -p 8000 -h /www")
        b = sb.port_forward(8000)[0]
        import urllib.request
        assert urllib.request.urlopen("http://127.0.0.1:%d/i" % b.local_port, timeout=20).read() == b"served\n"
        sb.allow_hosts("a.example")
        sb.remove_hosts("a.example")
        expect_error(lambda: sb.allow_hosts("not a host"), AirlockError.INVALID_PARAMS, "not a host")


async def async_suite() -> None:
    async with await AsyncSandbox.create(IMAGE) as sb:
        rs = await asyncio.gather(*(sb.exec(f"echo {i}; sleep 0.3") for i in range(6)))
        assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(6)]
        p = await sb.spawn(["cat"])
        await p.write("async-in")
        await p.close_stdin()
        out = b"".join([d async for _, d in p.output()])
        assert out == b"async-in" and await p.wait() == 0
        await sb.write_file("/x.txt", "hi")
        assert await sb.read_file("/x.txt") == b"hi"
        try:
            await sb.exec("sleep 30", timeout=1)
            raise AssertionError("expected timeout")
        except asyncio.TimeoutError:
            pass
        assert (await sb.exec("echo alive")).stdout == b"alive\n"


def attach_suite() -> None:
    rootfs = os.environ.get("AIRLOCK_TEST_ROOTFS")
    args = [BIN, "run", "-d"] + (["--rootfs", rootfs] if rootfs else ["--image", IMAGE])
    sid = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    try:
        sb = Sandbox.attach(sid)
        assert sb.id == sid
        sb.write_file("/root/note", b"kept")
        sb.close()  # leaves the sandbox running
        out = subprocess.run([BIN, "exec", sid, "--", "cat", "/root/note"], check=True,
                             capture_output=True).stdout
        assert out == b"kept", out
    finally:
        subprocess.run([BIN, "rm", "-f", sid], check=True, capture_output=True)


if __name__ == "__main__":
    try:
        sync_suite()
        asyncio.run(async_suite())
        attach_suite()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
    print("python sdk: ok")
