#!/usr/bin/env python3
"""pylxd (PyPI) against skiffd, unchanged: list, exec, files, state.

Expects a running instance NAME. Prints "ok <what>" or "FAIL <what>: <why>"
per check; exits 1 if any failed.
    tests/clients/pylxd-client.py SOCKET NAME
"""
import sys
import traceback

import pylxd

sock, name = sys.argv[1], sys.argv[2]
failed = False


def check(what, fn):
    global failed
    try:
        fn()
        print("ok", what)
    except Exception as e:  # report and go on
        failed = True
        print("FAIL", what + ":", repr(e))
        traceback.print_exc(limit=3)


client = pylxd.Client(endpoint=sock)


def listing():
    names = [i.name for i in client.instances.all()]
    assert name in names, names


def get_state():
    inst = client.instances.get(name)
    assert inst.status == "Running", inst.status
    st = inst.state()
    assert st.status == "Running", st.status


def execute():
    inst = client.instances.get(name)
    r = inst.execute(["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert r.exit_code == 4, r
    assert r.stdout.strip() == "out", r.stdout
    assert r.stderr.strip() == "err", r.stderr


def files():
    inst = client.instances.get(name)
    inst.files.put("/root/pylxd-file", b"pylxd data\n", mode=0o600)
    data = inst.files.get("/root/pylxd-file")
    assert data == b"pylxd data\n", data
    inst.files.delete("/root/pylxd-file")


check("instances.all", listing)
check("instance state", get_state)
check("execute", execute)
check("files put/get/delete", files)
sys.exit(1 if failed else 0)
