"""Result and error types."""

from dataclasses import dataclass, field
from typing import List, Optional


class AirlockError(Exception):
    """An error answer from Airlock (JSON-RPC `code` and `message`)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    VM_FAILED = -32000
    EXEC_FAILED = -32001
    FILE_FAILED = -32002

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


@dataclass
class ExecResult:
    """A finished command."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: int = 0


@dataclass
class FileInfo:
    """A directory entry."""

    name: str
    size: int
    mode: int
    is_dir: bool


@dataclass
class Binding:
    """A bound port forward."""

    address: str
    local_port: int
    remote_port: int


@dataclass
class SecretSpec:
    """A secret: the guest sees a placeholder; the value goes only to `hosts`."""

    name: str
    value: str
    hosts: List[str] = field(default_factory=list)
    placeholder: Optional[str] = None
