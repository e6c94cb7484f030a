"""Airlock's Python SDK: run commands in microVM sandboxes, sync or asyncio.

    from airlock_sdk import Sandbox

    with Sandbox.create(image="alpine") as sb:
        print(sb.exec(["uname", "-r"]).stdout)

It speaks Airlock's JSON-RPC API (matchlock-compatible) to `airlock rpc` (the sandbox lives as
long as the Sandbox object), or to the socket of a sandbox started with `airlock run -d`
(`Sandbox.attach(id)`).
"""

from ._async import AsyncProcess, AsyncSandbox
from ._sync import Process, Sandbox
from ._types import AirlockError, Binding, ExecResult, FileInfo, SecretSpec

__all__ = [
    "AirlockError",
    "AsyncProcess",
    "AsyncSandbox",
    "Binding",
    "ExecResult",
    "FileInfo",
    "Process",
    "Sandbox",
    "SecretSpec",
]
