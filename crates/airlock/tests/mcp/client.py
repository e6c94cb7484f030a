"""Drives `airlock mcp` with the official MCP Python SDK's stdio client (PyPI `mcp`).

Usage: python3 client.py AIRLOCK_BIN PROJECT_DIR API_PORT CA_FILE
       python3 client.py --sigterm AIRLOCK_BIN   (create a sandbox, then SIGTERM the server)
The server's environment holds MCP_KEY (the real key); this script never sees its value in
any tool result. Prints one JSON object: what the Rust test checks on the host side.
"""
import asyncio
import json
import os
import signal
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

SIGTERM = sys.argv[1] == "--sigterm"
if SIGTERM:
    airlock = sys.argv[2]
else:
    airlock, project, port, ca = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
report = {}


def children():
    """Pids of this process's children (the stdio client does not expose its process)."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(d))
    return out


async def sigterm_server(s):
    """A sandbox is running; SIGTERM the server and wait until it has exited."""
    left = json.loads(await call(s, "create_sandbox", {"image": "demo/debian:bookworm"}))
    report["left_running"] = left["sandbox_id"]
    pids = children()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGTERM)
    for _ in range(300):
        try:
            stat = open(f"/proc/{pids[0]}/stat").read()
        except FileNotFoundError:
            break  # exited and already reaped by the client
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("airlock mcp did not exit within 30 s of SIGTERM")
    report["sigterm"] = "exited"


def text(res):
    return "".join(c.text for c in res.content if getattr(c, "type", "") == "text")


async def call(s, name, args, ok=True):
    res = await s.call_tool(name, args)
    t = text(res)
    assert bool(res.is_error) != ok, f"{name} {args}: isError={res.is_error}: {t}"
    return t


async def main():
    params = StdioServerParameters(command=airlock, args=["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            tools = sorted(t.name for t in (await s.list_tools()).tools)
            report["tools"] = tools
            for want in ["create_sandbox", "destroy_sandbox", "exec", "list_files", "read_file", "write_file"]:
                assert want in tools, tools
            if SIGTERM:
                await sigterm_server(s)
                print(json.dumps(report))
                os._exit(0)  # the session cannot close cleanly with its server gone

            # A value in the arguments is refused, without echoing it.
            t = await call(s, "create_sandbox", {"image": "demo/debian:bookworm",
                                                  "secrets": ["MCP_KEY=inline-value-123@api.anthropic.com"]}, ok=False)
            assert "by name" in t and "inline-value-123" not in t, t
            t = await call(s, "create_sandbox", {"image": "demo/debian:bookworm",
                                                  "secrets": ["NOT_SET_ANYWHERE@api.anthropic.com"]}, ok=False)
            assert "not set" in t, t

            created = json.loads(await call(s, "create_sandbox", {
                "image": "demo/debian:bookworm",
                "allow_hosts": ["api.anthropic.com"],
                "secrets": ["MCP_KEY@api.anthropic.com"],
                "shares": [f"{project}:/workspace"],
                "add_hosts": ["api.anthropic.com:127.0.0.1"],
                "upstream_ca": [ca],
            }))
            sid = created["sandbox_id"]
            report["sandbox"] = sid
            assert created["secrets_as_placeholders"] == ["MCP_KEY"], created

            # The guest holds a placeholder; the request to the allowed host carries the key.
            out = json.loads(await call(s, "exec", {"sandbox_id": sid, "command": "printf %s \"$MCP_KEY\""}))
            report["seen"] = out["stdout"]
            assert out["exit_code"] == 0 and out["stdout"].startswith("AIRLOCK_PLACEHOLDER_"), out
            out = json.loads(await call(s, "exec", {"sandbox_id": sid, "command":
                f"curl -sS -o /dev/null -w '%{{http_code}}' -H \"x-api-key: $MCP_KEY\" https://api.anthropic.com:{port}/v1/models"}))
            assert out["stdout"] == "200", out
            # Anything else is blocked.
            out = json.loads(await call(s, "exec", {"sandbox_id": sid, "command":
                "curl -sS -m 20 https://example.com/ >/dev/null"}))
            assert out["exit_code"] != 0, out
            report["blocked_stderr"] = out["stderr"]
            out = json.loads(await call(s, "exec", {"sandbox_id": sid, "command": "echo to-stderr >&2; exit 3"}))
            assert out["exit_code"] == 3 and out["stderr"] == "to-stderr\n", out

            # Files: the share is an overlay, so writes stay in the sandbox.
            await call(s, "write_file", {"sandbox_id": sid, "path": "/workspace/new.txt", "content": "made by mcp\n"})
            assert await call(s, "read_file", {"sandbox_id": sid, "path": "/workspace/new.txt"}) == "made by mcp\n"
            assert await call(s, "read_file", {"sandbox_id": sid, "path": "/workspace/README.md"}) == "from the host\n"
            names = [e["name"] for e in json.loads(await call(s, "list_files", {"sandbox_id": sid, "path": "/workspace"}))]
            assert sorted(names) == ["README.md", "new.txt"], names
            await call(s, "read_file", {"sandbox_id": sid, "path": "/workspace/missing"}, ok=False)
            await call(s, "read_file", {"sandbox_id": sid, "path": "relative"}, ok=False)

            # Destroy one; a second sandbox is left for the server to clean up on exit.
            await call(s, "destroy_sandbox", {"sandbox_id": sid})
            t = await call(s, "exec", {"sandbox_id": sid, "command": "true"}, ok=False)
            assert "no sandbox" in t, t
            left = json.loads(await call(s, "create_sandbox", {"image": "demo/debian:bookworm"}))
            report["left_running"] = left["sandbox_id"]
            out = json.loads(await call(s, "exec", {"sandbox_id": left["sandbox_id"], "command": "echo alive"}))
            assert out["stdout"] == "alive\n", out
    print(json.dumps(report))


asyncio.run(main())
