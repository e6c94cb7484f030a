"""Drives `airlock mcp --pool 1` with the official MCP Python SDK: the first create of a shape
starts on its own and makes that shape's pool; once `airlock pool ls` shows it ready, the next
create is a claim from it, a distinct machine that runs commands.

Usage: python3 pool_client.py AIRLOCK_BIN   (prints one JSON object for the Rust test)
"""
import asyncio
import json
import os
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

airlock = sys.argv[1]
report = {}


def text(res):
    return "".join(c.text for c in res.content if getattr(c, "type", "") == "text")


async def call(s, name, args):
    res = await s.call_tool(name, args)
    t = text(res)
    assert not res.is_error, f"{name} {args}: {t}"
    return json.loads(t)


def pools():
    out = subprocess.run([airlock, "pool", "ls", "--json"], check=True, capture_output=True)
    return [p for h in json.loads(out.stdout) for p in h["pools"]]


async def main():
    params = StdioServerParameters(command=airlock, args=["mcp", "--pool", "1"], env=dict(os.environ))
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            img = {"image": "demo/debian:bookworm"}
            first = await call(s, "create_sandbox", img)
            report["first_start"] = first["start"]
            deadline = time.time() + 300
            while True:
                ps = pools()
                if ps and ps[0]["ready"] == 1:
                    break
                assert time.time() < deadline, f"the pool never filled: {ps}"
                await asyncio.sleep(0.5)
            report["before"] = ps[0]
            second = await call(s, "create_sandbox", img)
            report["second_start"] = second["start"]
            probe = "cat /etc/machine-id; echo $((6*7))"
            a = await call(s, "exec", {"sandbox_id": first["sandbox_id"], "command": probe})
            b = await call(s, "exec", {"sandbox_id": second["sandbox_id"], "command": probe})
            report["first_out"], report["second_out"] = a["stdout"], b["stdout"]
            # Published every 2 s: wait for the claim to show, and the refill behind it.
            deadline = time.time() + 300
            while True:
                after = pools()[0]
                if after["claimed"] == 1 and after["ready"] == 1:
                    break
                assert time.time() < deadline, f"no claim or refill shown: {after}"
                await asyncio.sleep(0.5)
            report["after"] = after
    print(json.dumps(report))


asyncio.run(main())
