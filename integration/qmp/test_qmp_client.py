#!/usr/bin/env python3
"""Drives colo-blk's control socket with the qemu.qmp library, unchanged.

Proves that a stock QMP client (the one COLO tooling and qmp-shell use) can
negotiate, run every replication command, receive errors as ExecuteError and
receive events, against a real `colo-blk serve --mode secondary` process.
Prints `N passed, N failed` and exits non-zero on any failure.
"""
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("COLO_BLK", os.path.join(ROOT, "target", "release", "colo-blk"))

results = []


def check(name, cond, detail=""):
    results.append((name, bool(cond)))
    print(("PASS " if cond else "FAIL ") + name + (f" ({detail})" if detail and not cond else ""))


def wait_for(path, proc, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


async def next_event(listener, name, seconds=20):
    async def get():
        async for ev in listener:
            if ev["event"] == name:
                return ev
    return await asyncio.wait_for(get(), seconds)


async def scenario(ctl_path, proc):
    qmp = QMPClient("colo-blk-test")
    await qmp.connect(ctl_path)
    check("greeting names colo-blk", "colo-blk" in str(qmp.greeting))

    st = await qmp.execute("query-replication")
    check("query-replication before start", st.get("mode") == "secondary" and st.get("stage") == "none", st)

    try:
        await qmp.execute("replication-get-error")
        check("get-error before start is an error", False)
    except ExecuteError as e:
        check("get-error before start is an error", "not running" in str(e), e)

    try:
        await qmp.execute("replication-start", {"mode": "primary"})
        check("start with the wrong mode is refused", False)
    except ExecuteError as e:
        check("start with the wrong mode is refused", "mode" in str(e), e)

    with qmp.listener() as listener:
        await qmp.execute("replication-start", {"mode": "secondary"})
        ev = await next_event(listener, "REPLICATION_STAGE_CHANGED")
        check("start emits a stage event", ev["data"] == {"mode": "secondary", "stage": "running"}, ev)

    st = await qmp.execute("query-replication")
    check("stage is running after start", st.get("stage") == "running", st)
    check("checkpoint returns {}", await qmp.execute("replication-checkpoint") == {})
    check("get-error while running is {}", await qmp.execute("replication-get-error") == {})

    try:
        await qmp.execute("replication-start", {"mode": "secondary"})
        check("second start is refused", False)
    except ExecuteError as e:
        check("second start is refused", "running or done" in str(e), e)

    try:
        await qmp.execute("no-such-command")
        check("unknown command is a CommandNotFound error, as in QEMU", False)
    except ExecuteError as e:
        check("unknown command is a CommandNotFound error, as in QEMU",
              e.error_class == "CommandNotFound", e)

    try:
        await qmp.execute("replication-stop", {"failover": True, "extra": {}})
        check("an unexpected argument is refused", False)
    except ExecuteError as e:
        check("an unexpected argument is refused", str(e) == "Parameter 'extra' is unexpected", e)

    with qmp.listener() as listener:
        await qmp.execute("replication-stop", {"failover": True})
        ev = await next_event(listener, "REPLICATION_STAGE_CHANGED")
        # Failover passes through "failover"; a small disk may already be done.
        if ev["data"]["stage"] == "failover":
            ev = await next_event(listener, "REPLICATION_STAGE_CHANGED")
        check("failover ends in stage done", ev["data"]["stage"] == "done", ev)

    st = await qmp.execute("query-replication")
    check("query after failover", st.get("stage") == "done" and st.get("error") is None, st)
    check("start after failover is an accepted no-op",
          await qmp.execute("replication-start", {"mode": "secondary"}) == {})

    check("quit returns {}", await qmp.execute("quit") == {})
    try:
        await qmp.disconnect()
    except EOFError:
        # The server closes the stream after quit; qemu.qmp reports that EOF
        # on disconnect, exactly as with QEMU (its machine.py ignores it too).
        pass
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        code = None
    check("quit exits the daemon with status 0", code == 0, code)


def main():
    with tempfile.TemporaryDirectory() as d:
        img, sock, ctl, nbd = (os.path.join(d, n) for n in ("disk.img", "vhost.sock", "ctl.sock", "nbd.sock"))
        proc = subprocess.Popen([
            BIN, "serve", "--mode", "secondary", "--disk", img, "--size", str(64 << 20),
            "--socket", sock, "--control", ctl, "--nbd-listen", "unix:" + nbd,
        ])
        try:
            up = wait_for(ctl, proc)
            check("daemon creates its control socket", up)
            if up:
                asyncio.run(asyncio.wait_for(scenario(ctl, proc), 120))
        except Exception as e:  # any crash of the scenario is a failure, reported
            check("scenario ran to the end", False, repr(e))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = sum(1 for _, ok in results if not ok)
    print(f"qmp: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed or not results else 0)


if __name__ == "__main__":
    main()
