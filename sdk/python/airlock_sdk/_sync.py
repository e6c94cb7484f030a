"""The blocking client: the asyncio client run on a private event-loop thread."""

import asyncio
import threading
from typing import Any, Coroutine, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

from ._async import AsyncProcess, AsyncSandbox, Command
from ._types import Binding, ExecResult, FileInfo, SecretSpec

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Process:
    """A running command (see `Sandbox.spawn`)."""

    def __init__(self, loop: _Loop, p: AsyncProcess) -> None:
        self._l, self._p = loop, p

    def write(self, data: Union[bytes, str]) -> None:
        """Sends bytes to stdin."""
        self._l.run(self._p.write(data))

    def close_stdin(self) -> None:
        """End of file on stdin."""
        self._l.run(self._p.close_stdin())

    def signal(self, signal: int) -> None:
        """Sends a signal."""
        self._l.run(self._p.signal(signal))

    def resize(self, rows: int, cols: int) -> None:
        """Resizes the terminal."""
        self._l.run(self._p.resize(rows, cols))

    def output(self) -> Iterator[Tuple[str, bytes]]:
        """Yields ("stdout" | "stderr", bytes) until the command ends."""
        it = self._p.output().__aiter__()
        while True:
            try:
                yield self._l.run(it.__anext__())
            except StopAsyncIteration:
                return

    def wait(self) -> int:
        """Waits for the end; returns the exit code."""
        return self._l.run(self._p.wait())


class Sandbox:
    """A sandbox, driven with blocking calls. Use as a context manager."""

    def __init__(self, loop: _Loop, sb: AsyncSandbox) -> None:
        self._l, self._sb = loop, sb
        self.id = sb.id

    @classmethod
    def create(cls, image: Optional[str] = None, **kw: Any) -> "Sandbox":
        """Boots a sandbox (arguments as `AsyncSandbox.create`)."""
        loop = _Loop()
        try:
            return cls(loop, loop.run(AsyncSandbox.create(image, **kw)))
        except BaseException:
            loop.stop()
            raise

    @classmethod
    def attach(cls, sandbox_id: str, runtime_dir: Optional[str] = None) -> "Sandbox":
        """Connects to a sandbox started with `airlock run -d`."""
        loop = _Loop()
        try:
            return cls(loop, loop.run(AsyncSandbox.attach(sandbox_id, runtime_dir)))
        except BaseException:
            loop.stop()
            raise

    def exec(self, cmd: Command, *, cwd: Optional[str] = None, user: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, stdin: Optional[bytes] = None,
             timeout: Optional[float] = None) -> ExecResult:
        """Runs a command and collects its output."""
        return self._l.run(self._sb.exec(cmd, cwd=cwd, user=user, env=env, stdin=stdin,
                                         timeout=timeout))

    def spawn(self, cmd: Command, *, cwd: Optional[str] = None, user: Optional[str] = None,
              env: Optional[Dict[str, str]] = None,
              tty: Optional[Tuple[int, int]] = None) -> Process:
        """Starts a command with stdin attached."""
        return Process(self._l, self._l.run(self._sb.spawn(cmd, cwd=cwd, user=user, env=env,
                                                           tty=tty)))

    def write_file(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
        """Writes a file."""
        self._l.run(self._sb.write_file(path, data, mode))

    def read_file(self, path: str) -> bytes:
        """Reads a file."""
        return self._l.run(self._sb.read_file(path))

    def list_files(self, path: str) -> List[FileInfo]:
        """Lists a directory."""
        return self._l.run(self._sb.list_files(path))

    def port_forward(self, remote_port: int, local_port: int = 0,
                     address: str = "127.0.0.1") -> List[Binding]:
        """Forwards a host port to a guest port."""
        return self._l.run(self._sb.port_forward(remote_port, local_port, address))

    def allow_hosts(self, *hosts: str) -> None:
        """Adds allow rules."""
        self._l.run(self._sb.allow_hosts(*hosts))

    def remove_hosts(self, *hosts: str) -> None:
        """Removes allow rules."""
        self._l.run(self._sb.remove_hosts(*hosts))

    def close(self) -> None:
        """Stops the sandbox (if created here) and the client."""
        try:
            self._l.run(self._sb.close(), 30)
        finally:
            self._l.stop()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Process", "Sandbox", "SecretSpec"]
