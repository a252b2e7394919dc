#!/usr/bin/env python3
"""A fake skiff-vmm for the monitor's host tests: no VM, but the parts the
monitor sees. It writes a console line, serves a fake agent behind the
hybrid vsock socket (CONNECT 1024 -> OK; hello, ping, network, start_main,
stop_main, power), sends `ready` on <vsock>_1025, and on signals:
SIGUSR1 -> main_exited {code 1, restarting} ; SIGUSR2 -> main_exited
{code 7, not restarting} and "power off" (exit 0). A main process whose
args[0] is /nonexistent fails to start (not_found). Its pid goes to
$FAKE_PIDS, its requests to $FAKE_LOG. On --api-socket it answers
vm.pause, vm.resume, vm.add-disk and vm.snapshot (writes DIR/state and
DIR/memory);
with --restore DIR it checks DIR/state starts with "fake state" (else
exits 2 as skiff-vmm does), logs its devices to the console and, like a
restored agent, sends no `ready`. With --firmware (a full OS VM) SIGHUP
is the guest's reset (exit with --reset-exit-code), and a boot after a
reset never sends `ready` (a guest that does not come up again)."""

import json
import os
import signal
import socket
import struct
import sys
import threading
import time

args = sys.argv[1:]
opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
restore = opts.get("--restore")
if restore:
    try:
        with open(os.path.join(restore, "state")) as f:
            ok = f.read().startswith("fake state")
    except OSError:
        ok = False
    if not ok:
        sys.stderr.write(f"skiff-vmm: cannot restore: {restore}/state: bad magic\n")
        sys.exit(2)
vsock = dict(kv.split("=", 1) for kv in opts["--vsock"].split(","))["socket"]
serial = dict(kv.split("=", 1) for kv in opts["--serial"].split(","))
console = serial["file"]
if os.environ.get("FAKE_PIDS"):
    with open(os.environ["FAKE_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
with open(console, "a") as f:
    f.write("fake kernel booting\nskiff-agent: ready\n")
if "--net" in opts:
    with open(console, "a") as f:
        f.write(f"net {opts['--net']}\n")
if restore:
    with open(console, "a") as f:
        devices = [f"{a} {args[i + 1]}" for i, a in enumerate(args[:-1]) if a in ("--fs", "--disk")]
        f.write(f"restored from {restore}: {'; '.join(devices)}\n")

lock = threading.Lock()
events = None


def frame(msg):
    body = b"\x01" + json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


def read_frame(conn):
    hdr = b""
    while len(hdr) < 4:
        c = conn.recv(4 - len(hdr))
        if not c:
            return None
        hdr += c
    (n,) = struct.unpack(">I", hdr)
    body = b""
    while len(body) < n:
        c = conn.recv(n - len(body))
        if not c:
            return None
        body += c
    return json.loads(body[1:])


def emit(event):
    with lock:
        events.sendall(frame({"type": "event", "event": event}))


def log(req):
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps(req) + "\n")


def power_off(delay=0.2):
    def go():
        time.sleep(delay)
        os._exit(0)

    threading.Thread(target=go, daemon=True).start()


def serve(conn):
    line = b""
    while not line.endswith(b"\n"):
        c = conn.recv(1)
        if not c:
            return
        line += c
    conn.sendall(b"OK 1073741824\n")
    while True:
        msg = read_frame(conn)
        if msg is None:
            return
        if msg["type"] == "hello":
            conn.sendall(frame({"type": "welcome", "version": 2, "agent": "fake", "pid1": True}))
            continue
        rid, req = msg["id"], msg["request"]
        log(req)
        t = req["type"]
        if t == "ping":
            reply = {"type": "pong", "version": 2, "agent": "fake", "pid1": True}
        elif t == "start_main":
            if req["args"][0] == "/nonexistent":
                reply = {"type": "error", "code": "not_found", "message": "starting \"/nonexistent\": No such file"}
            else:
                reply = {"type": "exec_started", "pid": 42}
        elif t == "stop_main":
            status = {"kind": "signaled", "signal": 15}
            emit({"type": "main_exited", "status": status, "restarting": False})
            reply = {"type": "main_exited", "status": status}
            power_off()
        elif t == "power":
            reply = {"type": "ok"}
            power_off()
        else:
            reply = {"type": "ok"}
        conn.sendall(frame({"type": "reply", "id": rid, "reply": reply}))


def on_usr1(*_):
    threading.Thread(
        target=emit, args=({"type": "main_exited", "status": {"kind": "exited", "code": 1}, "restarting": True},)
    ).start()


def on_usr2(*_):
    def go():
        emit({"type": "main_exited", "status": {"kind": "exited", "code": 7}, "restarting": False})
        power_off()

    threading.Thread(target=go).start()


def api(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            c = conn.recv(4096)
            if not c:
                return
            data += c
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = next((int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")), 0)
        while len(body) < length:
            body += conn.recv(4096)
        endpoint = lines[0].split()[1].rsplit("/", 1)[1]
        log({"api": endpoint})
        status, reply = 204, b""
        if endpoint == "vm.snapshot":
            dest = json.loads(body)["destination"]
            os.makedirs(dest, exist_ok=True)
            with open(os.path.join(dest, "state"), "w") as f:
                f.write("fake state\n")
            with open(os.path.join(dest, "memory"), "wb") as f:
                f.write(b"\0" * 4096)
            status, reply = 200, json.dumps({"state_bytes": 11, "memory_bytes": 4096, "elapsed_ms": 1}).encode()
        elif endpoint == "vm.add-disk":
            status, reply = 200, json.dumps({"id": json.loads(body)["id"], "slot": 5}).encode()
        elif endpoint not in ("vm.pause", "vm.resume"):
            status, reply = 404, b'{"error":"unknown"}'
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(reply)}\r\n\r\n".encode() + reply)


def serve_api(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    while True:
        c, _ = s.accept()
        threading.Thread(target=api, args=(c,), daemon=True).start()


if "--api-socket" in opts:
    threading.Thread(target=serve_api, args=(opts["--api-socket"],), daemon=True).start()
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(vsock)
srv.listen(16)
events = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
events.connect(vsock + "_1025")
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
firmware_rebooted = False
if "--firmware" in args:
    marker = os.path.join(os.path.dirname(os.environ.get("FAKE_PIDS", "/nonexistent")), "firmware-booted")
    firmware_rebooted = os.path.exists(marker)
    open(marker, "a").close()
    code = int(opts.get("--reset-exit-code", "0"))
    signal.signal(signal.SIGHUP, lambda *_: os._exit(code))
if not restore and not firmware_rebooted:
    emit({"type": "ready", "version": 2, "agent": "fake", "pid1": True})
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
