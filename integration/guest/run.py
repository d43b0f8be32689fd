#!/usr/bin/env python3
"""Boots Linux guests on colo-blk under QEMU (TCG) and checks what they see.

Each case prepares a disk image on the host, starts the backend (colo-blk serve, or
qemu-storage-daemon with --backend qsd to tell backend bugs from recipe bugs),
boots the guest built by build.sh with the case named on the kernel command line,
collects the guest's verdict lines from the serial console, then checks the image
on the host after the VM is gone. Every process is started by this script and
killed by pid on every exit path.

Prints one line per check and closes with `N passed, N failed`; exits non-zero when
anything failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MIB = 1 << 20
DISK_SIZE = 64 * MIB
FS_SIZE = 48 * MIB
GUEST_MEM = "512M"
QUEUES = 2

GUEST_LINE = re.compile(r"GUEST-(START|CHECK|INFO|WAIT|DONE)\s*(.*)")


class RunnerError(Exception):
    """A host-side step of a case failed; the case reports it as a failed check."""


# --- processes ------------------------------------------------------------------


class Processes:
    """Every child this runner started, so that each one is killed by its pid."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        # Children die with the runner even if it is SIGKILLed, where util-linux's
        # setpriv can arrange it (it execs, so the pid stays the child's).
        self.prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(self.prefix + argv, **kw)
        self.children.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            self.stop(proc)
        self.children.clear()


PROCS = Processes()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- backends -------------------------------------------------------------------


def socket_inode(path: Path) -> tuple[int, int] | None:
    """Identifies the socket file at PATH (inode numbers alone get reused)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns) if path.is_socket() else None


def wait_for_socket(path: Path, proc: subprocess.Popen, what: str, timeout: float = 20.0,
                    stale: tuple[int, int] | None = None) -> None:
    """Waits until PROC listens on PATH: a socket there that is not the STALE inode."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"{what} exited with {proc.returncode} before listening")
        ino = socket_inode(path)
        if ino is not None and ino != stale:
            return
        time.sleep(0.05)
    raise RunnerError(f"{what} did not create {path} within {timeout:.0f}s")


@dataclass
class Backend:
    """One vhost-user-blk backend process serving one image on one socket."""

    kind: str  # "colo-blk" or "qsd"
    binary: str
    run_dir: Path
    socket: Path
    disk: Path
    readonly: bool = False
    # O_DIRECT on the image (colo-blk's io_uring engine; qsd's cache.direct with
    # aio=io_uring): requests stay in flight in the backend for as long as the
    # host's disk takes.
    direct: bool = False
    serial: str = ""
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def argv(self) -> list[str]:
        if self.kind == "qsd":
            ro = ",read-only=on" if self.readonly else ""
            return [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,filename={self.disk},node-name=d,discard=unmap{ro}"
                + (",cache.direct=on,aio=io_uring" if self.direct else ""),
                "--export",
                "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                f"addr.path={self.socket},writable={'off' if self.readonly else 'on'},"
                f"num-queues={QUEUES}",
            ]
        argv = [self.binary, "serve", "--socket", str(self.socket), "--disk", str(self.disk),
                "--num-queues", str(QUEUES)]
        if self.serial:
            argv += ["--serial", self.serial]
        if self.readonly:
            argv.append("--readonly")
        if self.direct:
            argv.append("--direct")
        return argv + self.extra

    def start(self) -> None:
        # A killed backend leaves its socket behind. colo-blk replaces a stale
        # socket (so the restart below is the path a user takes); qsd refuses it.
        stale = socket_inode(self.socket)
        if self.kind == "qsd" and self.socket.exists():
            self.socket.unlink()
        self.starts += 1
        log = open(self.run_dir / f"{self.socket.stem}-{self.kind}-{self.starts}.log", "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = PROCS.spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        log.close()
        wait_for_socket(self.socket, self.proc, f"{self.kind} backend", stale=stale)

    def kill(self) -> None:
        """Dies without warning, as a crashed backend would."""
        if self.proc is not None:
            PROCS.stop(self.proc, signal.SIGKILL)

    def stop(self) -> int | None:
        """Orderly shutdown; returns the exit status."""
        if self.proc is None:
            return None
        PROCS.stop(self.proc, signal.SIGTERM)
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        logs = sorted(self.run_dir.glob(f"{self.socket.stem}-{self.kind}-*.log"))
        if not logs:
            return ""
        text = logs[-1].read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


# --- the guest ------------------------------------------------------------------


def qemu_argv(kernel: Path, initrd: Path, socket: Path, append: str) -> list[str]:
    """The QEMU command line of every test guest (README shows it)."""
    return [
        "qemu-system-x86_64",
        "-M", "q35", "-accel", "tcg", "-smp", str(QUEUES), "-m", GUEST_MEM,
        "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEM},share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=c,path={socket},reconnect-ms=500",
        "-device", f"vhost-user-blk-pci,chardev=c,num-queues={QUEUES}",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet {append}",
        "-nographic", "-no-reboot", "-nic", "none",
    ]


@dataclass
class GuestResult:
    """What one boot of the guest reported."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    done: bool = False
    exited: bool = False
    stopped: bool = False  # a host action ended the VM on purpose
    error: str = ""


class Guest:
    """One running test VM: its console is parsed into a GuestResult; GUEST-WAIT
    lines are handed to the caller, which answers them with send()."""

    def __init__(self, ctx: "Context", name: str, socket: Path, args: dict[str, str]):
        self.name = name
        self.label = name.split("-")[-1] if "-" in name else "guest"
        self.result = GuestResult()
        self.deadline = time.monotonic() + ctx.timeout
        self.timeout = ctx.timeout
        append = " ".join(f"guest.{k}={v}" for k, v in args.items())
        argv = qemu_argv(ctx.kernel, ctx.initrd, socket, append)
        if ctx.verbose:
            print("  $ " + " ".join(argv), flush=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = PROCS.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        self.reader = threading.Thread(
            target=self._pump, args=(ctx.run_dir / f"{name}.console.log",), daemon=True)
        self.reader.start()

    def _pump(self, console_path: Path) -> None:
        with open(console_path, "wb") as console:
            assert self.proc.stdout is not None
            for raw in iter(self.proc.stdout.readline, b""):
                console.write(raw)
                console.flush()
                self.lines.put(raw.decode(errors="replace").rstrip("\r\n"))
        self.lines.put(None)

    def wait(self) -> str | None:
        """The next GUEST-WAIT token; None once the console closed or the deadline
        passed (then result.error says so)."""
        res = self.result
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                res.error = f"no verdict within {self.timeout:.0f}s"
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                return None
            m = GUEST_LINE.search(line)
            if not m:
                continue
            kind, rest = m.group(1), m.group(2).strip()
            print(f"  {self.label}| GUEST-{kind} {rest}", flush=True)
            if kind == "CHECK":
                verdict, _, what = rest.partition(" ")
                check, _, detail = what.partition(": ")
                res.checks.append((check, verdict == "ok", detail))
            elif kind == "INFO":
                key, _, value = rest.partition("=")
                res.info[key] = value
            elif kind == "WAIT":
                return rest
            elif kind == "DONE":
                res.done = True

    def send(self, text: str) -> None:
        """Types a line on the guest's serial console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{text}\n".encode())
        self.proc.stdin.flush()

    def finish(self) -> GuestResult:
        """Waits for the VM to power off after GUEST-DONE, then reaps it."""
        res = self.result
        if res.done and not res.error:
            try:
                self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
                res.exited = True
            except subprocess.TimeoutExpired:
                res.error = "VM did not power off"
        self.stop()
        return res

    def stop(self) -> None:
        """Kills the VM (if still running) by its pid."""
        PROCS.stop(self.proc)
        self.reader.join(timeout=5)


def boot_guest(ctx: "Context", name: str, socket: Path, args: dict[str, str],
               on_wait: dict[str, Callable[[], str | None]] | None = None) -> GuestResult:
    """Boots the guest on SOCKET with guest.KEY=VALUE ARGS; runs host actions for
    GUEST-WAIT tokens and types the token back (an action returning "stop" kills
    the VM there instead); returns when the VM has powered off or been stopped, or
    the deadline hit."""
    guest = Guest(ctx, name, socket, args)
    try:
        while (token := guest.wait()) is not None:
            action = (on_wait or {}).get(token)
            if action is None:
                guest.result.error = f"guest waits for unknown host action {token!r}"
                break
            if action() == "stop":
                guest.result.stopped = True
                break
            guest.send(token)
        return guest.finish()
    finally:
        guest.stop()


# --- host-side image checks -----------------------------------------------------


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=120, **kw)


def mkfs(img: Path, size: int, source_dir: Path | None = None) -> None:
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "guest"]
    if source_dir is not None:
        argv += ["-d", str(source_dir)]
    res = run(argv + [str(img), f"{size // 1024}k"])
    if res.returncode != 0:
        raise RunnerError(f"mke2fs: {res.stderr.decode(errors='replace')}")


def fsck_clean(img: Path) -> tuple[bool, str]:
    res = run(["e2fsck", "-f", "-n", str(img)])
    out = (res.stderr + res.stdout).decode(errors="replace").strip()
    return res.returncode == 0, out.splitlines()[-1] if out else ""


def fs_read(img: Path, path: str) -> bytes | None:
    """A file's bytes, read from the image by debugfs (no mount, no kernel)."""
    res = run(["debugfs", "-R", f"cat {path}", str(img)])
    if res.returncode != 0 or b"File not found" in res.stderr:
        return None
    return res.stdout


def md5_range(img: Path, offset: int, length: int) -> str:
    with open(img, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(length)).hexdigest()


def md5_bytes(data: bytes | None) -> str | None:
    return None if data is None else hashlib.md5(data).hexdigest()


def allocated_bytes(img: Path, start: int, end: int) -> int:
    """Bytes of [start, end) the host file system holds as data (SEEK_DATA/HOLE)."""
    total = 0
    fd = os.open(img, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after pos
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            pos = hole
    finally:
        os.close(fd)
    return total


# --- cases ----------------------------------------------------------------------


@dataclass
class Context:
    """What every case needs: paths, options, and the report it adds to."""

    backend: str
    colo_blk: str
    kernel: Path
    initrd: Path
    run_dir: Path
    timeout: float
    verbose: bool
    load_runs: int = 1
    seed: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, case: str, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {case}/{name}", flush=True)
        else:
            self.failed += 1
            self.failures.append(f"{case}/{name}")
            print(f"FAIL {case}/{name}: {detail}", flush=True)
        return ok

    def backend_for(self, name: str, disk: Path, **kw) -> Backend:
        return Backend(kind=self.backend, binary=self.colo_blk, run_dir=self.run_dir,
                       socket=self.run_dir / f"{name}.sock", disk=disk, **kw)

    def guest_args(self, case: str, backend: Backend, **extra: str) -> dict[str, str]:
        args = {"case": case, "size": str(DISK_SIZE), "queues": str(QUEUES),
                "ro": "1" if backend.readonly else "0"}
        if backend.kind == "colo-blk" and backend.serial:
            args["serial"] = backend.serial  # qsd's vhost-user-blk export has no serial
        args.update(extra)
        return args

    def skip(self, case: str, why: str) -> None:
        self.skipped += 1
        print(f"SKIP {case}: {why}", flush=True)

    def report_guest(self, case: str, res: GuestResult, finished: str = "guest-finished",
                     prefix: str = "guest") -> None:
        for name, ok, detail in res.checks:
            self.check(case, f"{prefix}:{name}", ok, detail)
        if res.stopped and not res.error:
            return  # the host ended this VM on purpose; its checks are above
        ok = res.done and res.exited and not res.error
        self.check(case, finished, ok, res.error or ("no GUEST-DONE" if not res.done else ""))
        if not ok:
            self.dump(case)

    def dump(self, case: str) -> None:
        for log in sorted(self.run_dir.glob(f"{case}*.log")):
            text = log.read_text(errors="replace").splitlines()[-25:]
            print(f"---- {log.name} (last {len(text)} lines)")
            print("\n".join(text))
        print("----", flush=True)


def new_image(ctx: Context, name: str) -> Path:
    img = ctx.run_dir / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(DISK_SIZE)
    return img


def case_disk(ctx: Context) -> None:
    """File system, raw I/O, discard and write-zeroes through the guest's kernel."""
    case = "disk"
    img = new_image(ctx, case)
    mkfs(img, FS_SIZE)
    fs_before = allocated_bytes(img, 0, FS_SIZE)
    backend = ctx.backend_for(case, img, serial="colo-guest-disk")
    backend.start()
    res = boot_guest(ctx, case, backend.socket, ctx.guest_args(case, backend))
    ctx.report_guest(case, res)
    status = backend.stop()
    ctx.check(case, "backend-clean-exit", status == 0, f"exit status {status}")

    clean, why = fsck_clean(img)
    ctx.check(case, "host:fsck-clean", clean, why)
    hello = fs_read(img, "/hello.txt")
    ctx.check(case, "host:file-content", hello == b"hello from the guest\n", repr(hello))
    got = md5_bytes(fs_read(img, "/dir/data.bin"))
    ctx.check(case, "host:file-data", got is not None and got == res.info.get("data_md5"),
              f"host {got}, guest {res.info.get('data_md5')}")
    ctx.check(case, "host:trash-gone", fs_read(img, "/trash") is None, "deleted file still there")
    got = md5_range(img, 52 * MIB, 4 * MIB)
    ctx.check(case, "host:raw-data", got == res.info.get("raw_md5"),
              f"host {got}, guest {res.info.get('raw_md5')}")
    held = allocated_bytes(img, 56 * MIB, 60 * MIB)
    ctx.check(case, "host:discard-punched-hole", held == 0, f"{held} bytes still allocated")
    got = md5_range(img, 60 * MIB, 4 * MIB)
    ctx.check(case, "host:write-zeroes-zeroed", got == md5_bytes(bytes(4 * MIB)), got)
    # 24 MiB of trash was written, synced, deleted and trimmed; without the trim
    # reaching the image the file system would hold at least that much more.
    grown = allocated_bytes(img, 0, FS_SIZE) - fs_before
    ctx.check(case, "host:fstrim-released-blocks", grown < 12 * MIB,
              f"file system area grew by {grown / MIB:.1f} MiB")


def case_readonly(ctx: Context) -> None:
    """A --readonly disk: the guest sees the flag, reads, and cannot write."""
    case = "readonly"
    token = f"made-by-the-host-{os.getpid()}"
    src = ctx.run_dir / "readonly-src"
    src.mkdir()
    (src / "host.txt").write_text(token + "\n")
    img = new_image(ctx, case)
    mkfs(img, FS_SIZE, src)
    before = md5_range(img, 0, DISK_SIZE)
    backend = ctx.backend_for(case, img, readonly=True, serial="colo-guest-ro")
    backend.start()
    res = boot_guest(ctx, case, backend.socket, ctx.guest_args(case, backend, expect=token))
    ctx.report_guest(case, res)
    status = backend.stop()
    ctx.check(case, "backend-clean-exit", status == 0, f"exit status {status}")
    ctx.check(case, "host:image-unchanged", md5_range(img, 0, DISK_SIZE) == before,
              "the read-only image was modified")


def case_reconnect(ctx: Context) -> None:
    """The backend is killed and restarted under an idle guest; the guest goes on."""
    case = "reconnect"
    img = new_image(ctx, case)
    mkfs(img, FS_SIZE)
    backend = ctx.backend_for(case, img, serial="colo-guest-rc")
    backend.start()
    restarted: list[bool] = []

    def restart() -> None:
        backend.kill()
        try:
            backend.start()
            restarted.append(True)
        except RunnerError as e:
            ctx.check(case, "backend-restart", False, str(e))

    res = boot_guest(ctx, case, backend.socket, ctx.guest_args(case, backend),
                     on_wait={"reconnect": restart})
    ctx.check(case, "backend-restarted", restarted == [True], "the guest never idled")
    ctx.report_guest(case, res)
    status = backend.stop()
    ctx.check(case, "backend-clean-exit", status == 0, f"exit status {status}")
    clean, why = fsck_clean(img)
    ctx.check(case, "host:fsck-clean", clean, why)
    for path, want in (("/before.txt", b"written before the restart\n"),
                       ("/after.txt", b"written after the restart\n")):
        got = fs_read(img, path)
        ctx.check(case, f"host:{path.strip('/')}", got == want, repr(got))
    for off in (56, 60):
        got = md5_range(img, off * MIB, 2 * MIB)
        ctx.check(case, f"host:raw-data-{off}M", got == res.info.get("raw_md5"),
                  f"host {got}, guest {res.info.get('raw_md5')}")


RESTART_KILLS = 10
# How long a guest process may make no progress before blkstress calls it hung.
HANG_SECONDS = 30
LOAD_LINE = re.compile(r"(\d+) request\(s\) to serve again")


@dataclass
class LoadRun:
    """What one restart-under-load run measured."""

    kills: int = 0
    figures: dict[str, str] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)
    result: GuestResult | None = None
    logs: list[str] = field(default_factory=list)
    restart_error: str = ""


def restart_under_load(ctx: Context, case: str, kind: str, kills: int,
                       rng: random.Random) -> LoadRun:
    """Boots the restart_load guest on a KIND backend and, once its load runs,
    SIGKILLs and restarts the backend KILLS times, 1 to 3 s apart (random)."""
    img = new_image(ctx, case)
    backend = Backend(kind=kind, binary=ctx.colo_blk, run_dir=ctx.run_dir,
                      socket=ctx.run_dir / f"{case}.sock", disk=img, serial="colo-guest-rl",
                      direct=True)
    backend.start()
    run = LoadRun()

    def kill_loop() -> None:
        for _ in range(kills):
            time.sleep(rng.uniform(1.0, 3.0))
            backend.kill()
            try:
                backend.start()
            except RunnerError as e:
                run.restart_error = str(e)
                return
            run.kills += 1
        # The guest stops its load only once the last backend serves it.
        time.sleep(rng.uniform(1.0, 3.0))

    res = boot_guest(ctx, case, backend.socket,
                     ctx.guest_args("restart_load", backend, hang=str(HANG_SECONDS)),
                     on_wait={"kills": kill_loop})
    run.result = res
    run.figures = dict(res.info)
    run.failed_checks = [f"{name}: {detail}" if detail else name
                         for name, ok, detail in res.checks if not ok]
    if not (res.done and res.exited and not res.error):
        run.failed_checks.append(f"guest-finished: {res.error or 'no GUEST-DONE'}")
    backend.stop()
    run.logs = [p.read_text(errors="replace")
                for p in sorted(ctx.run_dir.glob(f"{case}-{kind}-*.log"),
                                key=lambda p: int(p.stem.rsplit("-", 1)[1]))]
    return run


def case_restart_load(ctx: Context) -> None:
    """colo-blk SIGKILLed and restarted 10 times under O_DIRECT, AIO (QD 16) and
    large-read load: no guest I/O error, no hung request, every block intact, and
    the inflight buffer in use (GET_INFLIGHT_FD once, SET_INFLIGHT_FD at every
    start)."""
    if ctx.backend != "colo-blk":
        ctx.skip("restart-load", "asserts colo-blk; restart-load-qsd is the qsd run")
        return
    for n in range(1, ctx.load_runs + 1):
        case = "restart-load" if ctx.load_runs == 1 else f"restart-load-{n}"
        seed = ctx.seed + n
        print(f"  run {n}/{ctx.load_runs}, seed {seed}", flush=True)
        run = restart_under_load(ctx, case, "colo-blk", RESTART_KILLS, random.Random(seed))
        ctx.check(case, f"backend-killed-{RESTART_KILLS}-times", run.kills == RESTART_KILLS,
                  run.restart_error or f"{run.kills} kills")
        assert run.result is not None
        ctx.report_guest(case, run.result)
        logs = run.logs
        ctx.check(case, "host:get-inflight-fd-on-first-start",
                  bool(logs) and "GET_INFLIGHT_FD" in logs[0],
                  "the first backend was never asked for an inflight buffer")
        without = [i + 1 for i, text in enumerate(logs) if "SET_INFLIGHT_FD" not in text]
        ctx.check(case, "host:set-inflight-fd-at-every-start", bool(logs) and not without,
                  f"backend start(s) {without} got no SET_INFLIGHT_FD")
        resubmitted = sum(int(m) for text in logs for m in LOAD_LINE.findall(text))
        f = run.figures
        print(f"  figures: kills={run.kills} ops={f.get('load_ops')} "
              f"errors={f.get('load_errors')} mismatches={f.get('load_mismatches')} "
              f"hung={f.get('load_hung')} verified={f.get('load_verified')} "
              f"kernel_complaints={f.get('kernel_complaints')} resubmitted={resubmitted}",
              flush=True)


def case_restart_load_qsd(ctx: Context) -> None:
    """The restart-load scenario on qemu-storage-daemon, as a reference: what it
    gets wrong is reported, never counted as a failure."""
    case = "restart-load-qsd"
    if not shutil.which("qemu-storage-daemon"):
        ctx.skip(case, "qemu-storage-daemon not installed")
        return
    run = restart_under_load(ctx, case, "qsd", RESTART_KILLS, random.Random(ctx.seed))
    f = run.figures
    print(f"  reference (not asserted): qsd kills={run.kills} ops={f.get('load_ops')} "
          f"errors={f.get('load_errors')} mismatches={f.get('load_mismatches')} "
          f"hung={f.get('load_hung')} verified={f.get('load_verified')} "
          f"kernel_complaints={f.get('kernel_complaints')}", flush=True)
    for line in run.failed_checks:
        print(f"  reference: qsd guest saw {line}", flush=True)
    if not run.failed_checks:
        print("  reference: qsd survived this run", flush=True)


def ctl(ctx: Context, control: Path, *args: str) -> dict:
    """`colo-blk ctl --json` (the user-facing client), its answer parsed."""
    res = run([ctx.colo_blk, "ctl", "--control", str(control), "--json", *args])
    if res.returncode != 0:
        raise RunnerError(f"ctl {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")
    try:
        return json.loads(res.stdout or b"{}")
    except ValueError as e:
        raise RunnerError(f"ctl {' '.join(args)}: not JSON: {res.stdout!r}") from e


def wait_status(ctx: Context, control: Path, what: str, done: Callable[[dict], bool],
                timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = ctl(ctx, control, "status")
        if done(st):
            return st
        if time.monotonic() > deadline:
            raise RunnerError(f"no {what} within {timeout:.0f}s: {st}")
        time.sleep(0.1)


def same_bytes(a: Path, b: Path) -> tuple[bool, str]:
    x, y = a.read_bytes(), b.read_bytes()
    if len(x) != len(y):
        return False, f"sizes {len(x)} and {len(y)}"
    diff = next((i for i in range(0, len(x), 4096) if x[i:i + 4096] != y[i:i + 4096]), None)
    return diff is None, "" if diff is None else f"first differing 4 KiB block at {diff}"


COLO_ROUNDS = 3


def case_colo(ctx: Context) -> None:
    """COLO pair with real guests: checkpoints, primary lost, failover, a guest on
    the promoted secondary finds the file system of the last checkpoint."""
    colo_pair_case(ctx, "colo", tls=False)


def case_colo_tls(ctx: Context) -> None:
    """The colo case with the replication link over NBD TLS on TCP loopback
    (integration/tls/make-certs.sh credentials, the primary's identity required)."""
    colo_pair_case(ctx, "colo-tls", tls=True)


def colo_pair_case(ctx: Context, case: str, tls: bool) -> None:
    if ctx.backend != "colo-blk":
        ctx.skip(case, "needs colo-blk's --mode primary/secondary")
        return
    d = ctx.run_dir
    pri_img, sec_img = new_image(ctx, f"{case}-primary"), d / f"{case}-secondary.img"
    mkfs(pri_img, FS_SIZE)
    sec_ctl, pri_ctl, nbd = d / f"{case}-sec.ctl", d / f"{case}-pri.ctl", d / f"{case}-nbd.sock"
    listen, uri, sec_tls, pri_tls = f"unix:{nbd}", f"nbd+unix:///parent0?socket={nbd}", [], []
    if tls:
        certs = d / f"{case}-certs"
        subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "tls" / "make-certs.sh"),
                        str(certs)], check=True, stdout=subprocess.DEVNULL)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        listen, uri = f"tcp:127.0.0.1:{port}", f"nbd://127.0.0.1:{port}/parent0"
        sec_tls = ["--tls-creds-x509", str(certs / "server"),
                   "--tls-authz", "C=GB,O=Example,CN=client"]
        pri_tls = ["--tls-creds-x509", str(certs / "client")]
    secondary = ctx.backend_for(f"{case}-sec", sec_img, serial="colo-guest-sec", extra=[
        "--mode", "secondary", "--size", str(DISK_SIZE), "--control", str(sec_ctl),
        "--nbd-listen", listen, *sec_tls])
    secondary.start()
    primary = ctx.backend_for(f"{case}-pri", pri_img, serial="colo-guest-pri", extra=[
        "--mode", "primary", "--control", str(pri_ctl), "--secondary", uri, *pri_tls])
    primary.start()
    for path in (sec_ctl, pri_ctl):
        wait_for_socket(path, secondary.proc if path == sec_ctl else primary.proc, "control")

    ctl(ctx, sec_ctl, "start")
    ctl(ctx, pri_ctl, "start", "--sync", "full")
    wait_status(ctx, pri_ctl, "initial resync", lambda s: s.get("resync", {}).get("total")
                is not None and s["resync"].get("done") == s["resync"]["total"])
    ctx.check(case, "replication-started", True)

    # The secondary VM runs beside the primary one and reads its whole disk when
    # told to; it sits at a "command" prompt between reads.
    sec_guest = Guest(ctx, f"{case}-secondary", secondary.socket,
                      ctx.guest_args("colo_secondary", secondary))
    if sec_guest.wait() != "command":
        ctx.report_guest(case, sec_guest.finish(), "secondary-guest-ready", "secondary")
        return

    def secondary_view(label: str) -> str:
        sec_guest.send(f"read-{label}")
        if sec_guest.wait() != "command":
            return f"no answer ({sec_guest.result.error or 'guest stopped'})"
        return sec_guest.result.info.get(label, "no md5 reported")

    last_checkpoint = d / f"{case}-checkpoint.img"
    checkpoint_md5 = ""

    def checkpoint(k: int) -> Callable[[], None]:
        def take() -> None:
            nonlocal checkpoint_md5
            ctl(ctx, pri_ctl, "checkpoint")
            ctl(ctx, sec_ctl, "checkpoint")
            same, why = same_bytes(pri_img, sec_img)
            ctx.check(case, f"host:checkpoint-{k}-disks-equal", same, why)
            shutil.copyfile(pri_img, last_checkpoint)
            checkpoint_md5 = md5_range(last_checkpoint, 0, DISK_SIZE)
            view = secondary_view(f"checkpoint-{k}")
            ctx.check(case, f"secondary-guest-sees-checkpoint-{k}", view == checkpoint_md5,
                      f"guest read {view}, checkpoint is {checkpoint_md5}")
        return take

    def crash() -> str:
        primary.kill()
        return "stop"

    actions: dict[str, Callable[[], str | None]] = {
        f"checkpoint-{k}": checkpoint(k) for k in range(1, COLO_ROUNDS + 1)}
    actions["crash"] = crash
    res = boot_guest(ctx, f"{case}-primary", primary.socket,
                     ctx.guest_args("colo_primary", primary, rounds=str(COLO_ROUNDS)),
                     on_wait=actions)
    ctx.report_guest(case, res, prefix="primary")
    if not res.stopped:
        ctx.check(case, "primary-crashed-as-planned", False, res.error or "guest ended early")
        ctx.dump(case)
        return
    primary.kill()
    same, _ = same_bytes(sec_img, last_checkpoint)
    ctx.check(case, "host:uncheckpointed-writes-reached-secondary", not same,
              "the secondary disk still equals the last checkpoint: nothing to roll back")
    view = secondary_view("after-crash")
    ctx.check(case, "secondary-guest-never-sees-uncheckpointed-writes",
              view == checkpoint_md5, f"guest read {view}, checkpoint is {checkpoint_md5}")

    ctl(ctx, sec_ctl, "stop", "--failover")
    st = wait_status(ctx, sec_ctl, "end of failover",
                     lambda s: s.get("stage") in ("done", "failover-failed"))
    ctx.check(case, "failover-done", st.get("stage") == "done", str(st))
    view = secondary_view("after-failover")
    ctx.check(case, "secondary-guest-view-kept-through-failover", view == checkpoint_md5,
              f"guest read {view}, checkpoint is {checkpoint_md5}")
    sec_guest.send("stop")
    sec_guest.wait()
    ctx.report_guest(case, sec_guest.finish(), "secondary-guest-finished", "secondary")
    same, why = same_bytes(sec_img, last_checkpoint)
    ctx.check(case, "host:secondary-disk-equals-last-checkpoint", same, why)
    clean, why = fsck_clean(sec_img)
    ctx.check(case, "host:fsck-clean-after-failover", clean, why)

    args = ctx.guest_args("colo_verify", secondary, rounds=str(COLO_ROUNDS))
    for k in range(1, COLO_ROUNDS + 1):
        args[f"md5_{k}"] = res.info.get(f"md5_{k}", "missing")
    res = boot_guest(ctx, f"{case}-verify", secondary.socket, args)
    ctx.report_guest(case, res, "verify-guest-finished", "verify")
    status = secondary.stop()
    ctx.check(case, "secondary-clean-exit", status == 0, f"exit status {status}")
    clean, why = fsck_clean(sec_img)
    ctx.check(case, "host:fsck-clean-at-end", clean, why)
    got = fs_read(sec_img, "/after-failover.txt")
    ctx.check(case, "host:write-after-failover", got == b"written after failover\n", repr(got))


RESIZE_TO = 96 * MIB


def case_resize(ctx: Context) -> None:
    """The disk grows online (ctl resize) under a running guest, which sees the
    new size without a reboot and uses the bytes past the old end."""
    case = "resize"
    if ctx.backend != "colo-blk":
        ctx.skip(case, "colo-blk's ctl resize; qemu-storage-daemon has no such backend")
        return
    img = new_image(ctx, case)
    control = ctx.run_dir / "resize.ctl"
    backend = ctx.backend_for(case, img, serial="colo-guest-rs",
                              extra=["--control", str(control)])
    backend.start()
    wait_for_socket(control, backend.proc, "control socket")
    replies: list[dict] = []

    def grow() -> None:
        replies.append(ctl(ctx, control, "resize", str(RESIZE_TO)))
        print(f"  host| ctl resize {RESIZE_TO}: {replies[-1]}", flush=True)

    res = boot_guest(ctx, case, backend.socket,
                     ctx.guest_args(case, backend, newsize=str(RESIZE_TO)),
                     on_wait={"resize": grow})
    ctx.report_guest(case, res)
    reply = replies[0] if replies else {}
    # QEMU's vhost-user-blk negotiates the backend request channel and answers
    # the config-change message once it re-read the config space.
    ctx.check(case, "host:frontend-notified",
              reply.get("size") == RESIZE_TO and reply.get("old-size") == DISK_SIZE
              and reply.get("frontend") == "notified", repr(reply))
    log = backend.log_tail(200)
    status = backend.stop()
    ctx.check(case, "backend-clean-exit", status == 0, f"exit status {status}")
    ctx.check(case, "host:log-says-notified", "frontend notified of the new size" in log,
              log.splitlines()[-1] if log else "no log")
    size = img.stat().st_size
    ctx.check(case, "host:image-grown", size == RESIZE_TO, f"{size} bytes")
    got = md5_range(img, DISK_SIZE - MIB, MIB)
    ctx.check(case, "host:old-end-data", got == res.info.get("end_md5"),
              f"host {got}, guest {res.info.get('end_md5')}")
    for name, off in (("past-old-end-data", DISK_SIZE), ("new-last-mib-data", RESIZE_TO - MIB)):
        got = md5_range(img, off, MIB)
        ctx.check(case, f"host:{name}", got == res.info.get("past_md5"),
                  f"host {got}, guest {res.info.get('past_md5')}")


CASES: dict[str, Callable[[Context], None]] = {
    "disk": case_disk,
    "readonly": case_readonly,
    "reconnect": case_reconnect,
    "resize": case_resize,
    "colo": case_colo,
    "colo-tls": case_colo_tls,
    "restart-load": case_restart_load,
    "restart-load-qsd": case_restart_load_qsd,
}


# --- main -----------------------------------------------------------------------


def default_colo_blk() -> str:
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return str(Path(target) / "release" / "colo-blk")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["colo-blk", "qsd"], default="colo-blk",
                    help="serve the disk with colo-blk (default) or qemu-storage-daemon")
    ap.add_argument("--colo-blk", default=default_colo_blk(),
                    help="colo-blk binary (default: $CARGO_TARGET_DIR/release/colo-blk)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--timeout", type=float, default=180.0,
                    help="seconds one guest boot may take to report its verdict")
    ap.add_argument("--build-dir", default=os.environ.get("GUEST_BUILD_DIR",
                                                          str(REPO / "build" / "guest")))
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="print command lines")
    ap.add_argument("--load-runs", type=int, default=1,
                    help=f"runs of restart-load ({RESTART_KILLS} kills each; default 1)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the kill moments (default: from the clock, printed)")
    opts = ap.parse_args()

    names = [n for n in opts.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    env = dict(os.environ, GUEST_BUILD_DIR=opts.build_dir)
    subprocess.run([str(HERE / "build.sh")], check=True, env=env)
    build = Path(opts.build_dir)
    if opts.backend == "colo-blk" and not os.access(opts.colo_blk, os.X_OK):
        print(f"colo-blk binary not found at {opts.colo_blk} (cargo build --release)")
        print("0 passed, 1 failed")
        return 1

    run_dir = Path(tempfile.mkdtemp(prefix="colo-blk-guest-"))
    ctx = Context(backend=opts.backend, colo_blk=opts.colo_blk, kernel=build / "vmlinuz",
                  initrd=build / "initramfs.cpio.gz", run_dir=run_dir,
                  timeout=opts.timeout, verbose=opts.verbose,
                  load_runs=max(1, opts.load_runs),
                  seed=opts.seed if opts.seed is not None else int(time.time()))
    print(f"guest tests: backend {opts.backend}, cases {', '.join(names)}, logs in {run_dir}, "
          f"seed {ctx.seed}", flush=True)
    try:
        for name in names:
            started = time.monotonic()
            print(f"== case {name}", flush=True)
            try:
                CASES[name](ctx)
            except RunnerError as e:
                ctx.check(name, "host-setup", False, str(e))
                ctx.dump(name)
            finally:
                PROCS.stop_all()
            print(f"== case {name}: {time.monotonic() - started:.1f}s", flush=True)
    except KeyboardInterrupt as e:
        ctx.check("runner", "interrupted", False, str(e) or "interrupted")
    finally:
        PROCS.stop_all()
    if ctx.failed == 0 and not opts.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif ctx.failures:
        print(f"failed: {', '.join(ctx.failures)}; logs kept in {run_dir}")
    skipped = f", {ctx.skipped} skipped" if ctx.skipped else ""
    print(f"{ctx.passed} passed, {ctx.failed} failed{skipped}", flush=True)
    return 0 if ctx.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
