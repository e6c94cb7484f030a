"""The asyncio client."""

import asyncio
import base64
import json
import os
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from ._types import AirlockError, Binding, ExecResult, FileInfo, SecretSpec

Command = Union[str, Sequence[str]]
#: Bytes per write_file / read_file request (the server caps one line at 32 MiB).
CHUNK = 4 * 1024 * 1024


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s or "")


def _cmd_params(cmd: Command, cwd: Optional[str], user: Optional[str],
                env: Optional[Dict[str, str]]) -> Dict[str, Any]:
    p: Dict[str, Any] = {}
    if isinstance(cmd, str):
        p["command"] = cmd
    else:
        p["argv"] = list(cmd)
    if cwd:
        p["working_dir"] = cwd
    if user:
        p["user"] = user
    if env:
        p["env"] = dict(env)
    return p


class _Conn:
    """One JSON-RPC connection: requests by id, notifications routed to their request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 proc: Optional[asyncio.subprocess.Process] = None) -> None:
        self._r, self._w, self._proc = reader, writer, proc
        self._next = 1
        self._pending: Dict[int, asyncio.Future] = {}
        self._streams: Dict[int, asyncio.Queue] = {}
        self._lock = asyncio.Lock()
        self._task = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        err: Exception = AirlockError(AirlockError.VM_FAILED, "airlock connection closed")
        try:
            while True:
                line = await self._r.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "method" in msg:
                    params = msg.get("params") or {}
                    q = self._streams.get(params.get("id"))
                    if q is not None:
                        q.put_nowait((msg["method"], params))
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is None or fut.done():
                    continue
                if msg.get("error"):
                    e = msg["error"]
                    fut.set_exception(AirlockError(e.get("code", 0), e.get("message", "")))
                else:
                    fut.set_result(msg.get("result"))
        except Exception as e:  # noqa: BLE001 - reported to every waiter
            err = e
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for q in self._streams.values():
            q.put_nowait(("closed", {}))

    async def _send(self, msg: Dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        async with self._lock:
            self._w.write(data)
            await self._w.drain()

    def start(self, method: str, params: Dict[str, Any],
              stream: bool = False) -> Tuple[int, "asyncio.Future[Any]", Optional[asyncio.Queue]]:
        rid = self._next
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        q = None
        if stream:
            q = asyncio.Queue()
            self._streams[rid] = q
        asyncio.ensure_future(self._send(
            {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        return rid, fut, q

    async def call(self, method: str, params: Optional[Dict[str, Any]] = None) -> Any:
        _, fut, _ = self.start(method, params or {})
        return await fut

    async def notify(self, method: str, params: Dict[str, Any]) -> None:
        await self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def done_stream(self, rid: int) -> None:
        self._streams.pop(rid, None)

    async def close(self) -> None:
        try:
            self._w.close()
        except Exception:  # noqa: BLE001
            pass
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._task.cancel()


class AsyncProcess:
    """A running command with stdin, signals, terminal size and streamed output."""

    def __init__(self, conn: _Conn, rid: int, fut: "asyncio.Future[Any]",
                 q: asyncio.Queue, prefix: str) -> None:
        self._c, self._rid, self._fut, self._q, self._p = conn, rid, fut, q, prefix
        self.exit_code: Optional[int] = None

    async def write(self, data: Union[bytes, str]) -> None:
        """Sends bytes to the command's stdin."""
        if isinstance(data, str):
            data = data.encode()
        for i in range(0, len(data), CHUNK):
            await self._c.call(f"{self._p}.stdin", {"id": self._rid, "data": _b64(data[i:i + CHUNK])})

    async def close_stdin(self) -> None:
        """The command sees end of file."""
        await self._c.call(f"{self._p}.stdin_eof", {"id": self._rid})

    async def signal(self, signal: int) -> None:
        """Sends a signal to the command."""
        await self._c.call(f"{self._p}.signal", {"id": self._rid, "signal": signal})

    async def resize(self, rows: int, cols: int) -> None:
        """Resizes the command's terminal."""
        await self._c.call("exec_tty.resize", {"id": self._rid, "rows": rows, "cols": cols})

    async def output(self) -> AsyncIterator[Tuple[str, bytes]]:
        """Yields ("stdout" | "stderr", bytes) until the command ends."""
        while True:
            if self._fut.done() and self._q.empty():
                break
            get = asyncio.ensure_future(self._q.get())
            await asyncio.wait([get, self._fut], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                continue
            method, params = get.result()
            if method.endswith(".stdout"):
                yield "stdout", _unb64(params.get("data", ""))
            elif method.endswith(".stderr"):
                yield "stderr", _unb64(params.get("data", ""))
            elif method == "closed":
                break

    async def wait(self) -> int:
        """Waits for the end; returns the exit code (128+N for signal N)."""
        try:
            r = await self._fut
        finally:
            self._c.done_stream(self._rid)
        self.exit_code = int(r["exit_code"])
        return self.exit_code


class AsyncSandbox:
    """A sandbox, driven over asyncio."""

    def __init__(self, conn: _Conn, sandbox_id: str, owned: bool) -> None:
        self._c = conn
        self.id = sandbox_id
        self._owned = owned

    @classmethod
    async def create(cls, image: Optional[str] = None, *, rootfs: Optional[str] = None,
                     cpus: Optional[float] = None, memory_mb: Optional[int] = None,
                     disk_size_mb: Optional[int] = None, env: Optional[Dict[str, str]] = None,
                     allow_hosts: Optional[List[str]] = None,
                     secrets: Optional[List[SecretSpec]] = None, no_network: bool = False,
                     hostname: Optional[str] = None, timeout_seconds: Optional[int] = None,
                     binary: Optional[str] = None) -> "AsyncSandbox":
        """Boots a sandbox in a new `airlock rpc` process (stopped by `close`)."""
        exe = binary or os.environ.get("AIRLOCK_BIN", "airlock")
        proc = await asyncio.create_subprocess_exec(
            exe, "rpc", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, limit=64 * 1024 * 1024)
        assert proc.stdout is not None and proc.stdin is not None
        conn = _Conn(proc.stdout, proc.stdin, proc)  # type: ignore[arg-type]
        p: Dict[str, Any] = {"image": image or ""}
        if rootfs:
            p["rootfs"] = rootfs
        res = {k: v for k, v in {"cpus": cpus, "memory_mb": memory_mb,
                                   "disk_size_mb": disk_size_mb,
                                   "timeout_seconds": timeout_seconds}.items() if v}
        if res:
            p["resources"] = res
        if env:
            p["env"] = env
        if hostname:
            p["hostname"] = hostname
        if no_network:
            p["network"] = {"no_network": True}
        elif allow_hosts or secrets:
            p["network"] = {
                "allowed_hosts": list(allow_hosts or []),
                "secrets": {s.name: {"value": s.value, "hosts": s.hosts,
                                     **({"placeholder": s.placeholder} if s.placeholder else {})}
                            for s in (secrets or [])},
            }
        try:
            r = await conn.call("create", p)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, r["id"], True)

    @classmethod
    async def attach(cls, sandbox_id: str, runtime_dir: Optional[str] = None) -> "AsyncSandbox":
        """Connects to a sandbox started with `airlock run -d` (closing leaves it running)."""
        rt = runtime_dir or _runtime_dir()
        r, w = await asyncio.open_unix_connection(
            os.path.join(rt, "sandboxes", sandbox_id, "sock"), limit=64 * 1024 * 1024)
        conn = _Conn(r, w)
        info = await conn.call("info")
        return cls(conn, info["id"], False)

    async def exec(self, cmd: Command, *, cwd: Optional[str] = None,
                   user: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                   stdin: Optional[bytes] = None, timeout: Optional[float] = None) -> ExecResult:
        """Runs a command (a string runs with `sh -c`) and collects its output."""
        p = _cmd_params(cmd, cwd, user, env)
        if stdin is not None:
            p["stdin"] = _b64(stdin)
        rid, fut, _ = self._c.start("exec", p)
        try:
            r = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            # The server answers the cancelled request with an error nobody waits for.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            await self._c.call("cancel", {"id": rid})
            raise
        return ExecResult(int(r["exit_code"]), _unb64(r["stdout"]), _unb64(r["stderr"]),
                          int(r.get("duration_ms", 0)))

    async def spawn(self, cmd: Command, *, cwd: Optional[str] = None,
                    user: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                    tty: Optional[Tuple[int, int]] = None) -> AsyncProcess:
        """Starts a command with stdin attached; stream its output with `output()`.
        `tty=(rows, cols)` gives it a terminal."""
        p = _cmd_params(cmd, cwd, user, env)
        method = "exec_pipe"
        if tty:
            method = "exec_tty"
            p["rows"], p["cols"] = tty
        rid, fut, q = self._c.start(method, p, stream=True)
        assert q is not None
        # Wait for `.ready`: only then does the server accept stdin for this id.
        while True:
            get = asyncio.ensure_future(q.get())
            await asyncio.wait([get, fut], return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                if get.result()[0].endswith(".ready"):
                    break
            else:
                get.cancel()
                await fut  # raises the error
                break
        return AsyncProcess(self._c, rid, fut, q, method)

    async def write_file(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
        """Writes a file (parents created); large data goes in chunks."""
        if isinstance(data, str):
            data = data.encode()
        first = True
        for i in range(0, max(len(data), 1), CHUNK):
            await self._c.call("write_file", {"path": path, "content": _b64(data[i:i + CHUNK]),
                                              "mode": mode, "append": not first})
            first = False

    async def read_file(self, path: str) -> bytes:
        """Reads a file, in chunks."""
        out = bytearray()
        while True:
            r = await self._c.call("read_file", {"path": path, "offset": len(out),
                                                 "length": CHUNK})
            b = _unb64(r["content"])
            out += b
            if len(b) < CHUNK:
                return bytes(out)

    async def list_files(self, path: str) -> List[FileInfo]:
        """Lists a directory."""
        r = await self._c.call("list_files", {"path": path})
        return [FileInfo(f["name"], f["size"], f["mode"], f["is_dir"]) for f in r["files"]]

    async def port_forward(self, remote_port: int, local_port: int = 0,
                           address: str = "127.0.0.1") -> List[Binding]:
        """Forwards host `address:local_port` (0: any free port) to guest `remote_port`."""
        r = await self._c.call("port_forward", {
            "forwards": [{"local_port": local_port, "remote_port": remote_port}],
            "addresses": [address]})
        return [Binding(b["address"], b["local_port"], b["remote_port"]) for b in r["bindings"]]

    async def allow_hosts(self, *hosts: str) -> None:
        """Adds network allow rules at run time."""
        await self._c.call("allow_list_add", {"hosts": list(hosts)})

    async def remove_hosts(self, *hosts: str) -> None:
        """Removes network allow rules."""
        await self._c.call("allow_list_delete", {"hosts": list(hosts)})

    async def close(self) -> None:
        """Stops the sandbox (when created here) and closes the connection."""
        try:
            await self._c.call("close", {"timeout_seconds": 5})
        except Exception:  # noqa: BLE001 - closing an already dead connection
            pass
        await self._c.close()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _runtime_dir() -> str:
    if os.environ.get("AIRLOCK_RUNTIME_DIR"):
        return os.environ["AIRLOCK_RUNTIME_DIR"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "airlock")
    return f"/tmp/airlock-{os.getuid()}"
