#!/usr/bin/env python3
"""Waits, as a stock qemu.qmp client, for one QMP event on a colo-blk control socket.

    wait_event.py CONTROL_SOCKET EVENT_NAME SECONDS

Connects and negotiates, prints `READY` (flushed) once it listens, then prints
the event as JSON and exits 0 when it arrives; exits 1 after SECONDS without it.
Tests use it to prove that tooling built on qemu.qmp sees colo-blk's events.
"""
import asyncio
import json
import sys

from qemu.qmp import QMPClient


async def main(path, name, seconds):
    qmp = QMPClient("colo-blk-wait-event")
    await qmp.connect(path)
    try:
        with qmp.listener() as listener:
            print("READY", flush=True)

            async def get():
                async for ev in listener:
                    if ev["event"] == name:
                        return ev
                return None

            try:
                ev = await asyncio.wait_for(get(), seconds)
            except asyncio.TimeoutError:
                print(f"no {name} within {seconds} s", flush=True)
                return 1
            print(json.dumps(dict(ev)), flush=True)
            return 0
    finally:
        await qmp.disconnect()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]))))
