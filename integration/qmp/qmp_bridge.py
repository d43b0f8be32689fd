#!/usr/bin/env python3
"""Runs QMP commands with the stock qemu.qmp client, one connection per command
(as libxl's libxl_qmp.c does), for tests written in another language.

stdin: one JSON object per line, {"sock": PATH, "execute": NAME, "arguments": {...}}.
stdout: one JSON object per line, {"return": ...} or {"error": {"class", "desc"}}.
Ends at EOF. Any failure to connect is reported as {"error": {"class": "Connect", ...}}.
"""
import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient


async def run(req):
    qmp = QMPClient("libxl-sequence")
    try:
        await asyncio.wait_for(qmp.connect(req["sock"]), 30)
    except Exception as e:  # the test reports it, with the command it was for
        return {"error": {"class": "Connect", "desc": f"{type(e).__name__}: {e}"}}
    try:
        ret = await asyncio.wait_for(qmp.execute(req["execute"], req.get("arguments")), 120)
        return {"return": ret}
    except ExecuteError as e:
        return {"error": {"class": e.error_class, "desc": e.error.error.desc}}
    finally:
        await qmp.disconnect()


async def main():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        reply = await run(json.loads(line))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


asyncio.run(main())
