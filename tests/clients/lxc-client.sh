#!/usr/bin/env bash
# Debian's LXD client (`lxc`, lxd-client 5.0.2) against skiffd, unchanged:
# LXD_DIR points it at skiffd's socket. Expects a running instance NAME
# (a thin VM of the demo image) and a stopped-or-running instance OTHER.
# Prints one line per check: "ok <what>" or "FAIL <what>: <why>"; exits 1
# if any check failed.
#   tests/clients/lxc-client.sh NAME OTHER      (SKIFF_DIR: the daemon's dir)
set -uo pipefail
NAME=$1 OTHER=$2
export LXD_DIR=${SKIFF_DIR:-/var/lib/skiff} HOME=${HOME:-/root}
# The client keeps its own config; a fresh one per run.
export LXD_CONF=$(mktemp -d)
trap 'rm -rf "$LXD_CONF"' EXIT
FAILED=0
ok() { echo "ok $1"; }
fail() { echo "FAIL $1: $2"; FAILED=1; }
check() { local what=$1; shift; local out; if out=$("$@" 2>&1); then ok "$what"; else fail "$what" "$out"; fi; }

out=$(lxc list --format csv -c ns 2>&1) && [[ $out == *"$NAME,RUNNING"* ]] && ok "lxc list" || fail "lxc list" "$out"
out=$(lxc exec "$NAME" -- echo from-lxc 2>&1) && [[ $out == from-lxc ]] && ok "lxc exec output" || fail "lxc exec output" "$out"
lxc exec "$NAME" -- sh -c 'exit 5' >/dev/null 2>&1; rc=$?
[[ $rc == 5 ]] && ok "lxc exec exit code" || fail "lxc exec exit code" "got $rc"
out=$(echo piped | lxc exec "$NAME" -- cat 2>&1) && [[ $out == piped ]] && ok "lxc exec stdin" || fail "lxc exec stdin" "$out"
f=$(mktemp); echo "lxc file content" > "$f"; chmod 640 "$f"
check "lxc file push" lxc file push "$f" "$NAME/root/lxc-file"
g=$(mktemp -u)
if lxc file pull "$NAME/root/lxc-file" "$g" >/dev/null 2>&1 && cmp -s "$f" "$g"; then ok "lxc file pull"; else fail "lxc file pull" "content differs or pull failed"; fi
rm -f "$f" "$g"
check "lxc snapshot" lxc snapshot "$NAME" lxcsnap
out=$(lxc info "$NAME" 2>&1) && [[ $out == *lxcsnap* ]] && ok "lxc info shows the snapshot" || fail "lxc info" "$out"
check "lxc stop" lxc stop "$OTHER"
out=$(lxc list --format csv -c ns 2>&1); [[ $out == *"$OTHER,STOPPED"* ]] && ok "lxc list after stop" || fail "lxc list after stop" "$out"
check "lxc start" lxc start "$OTHER"
check "lxc exec after start" lxc exec "$OTHER" -- true
check "lxc config set" lxc config set "$OTHER" user.note hello
out=$(lxc config get "$OTHER" user.note 2>&1) && [[ $out == hello ]] && ok "lxc config get" || fail "lxc config get" "$out"
check "lxc delete --force" lxc delete --force "$OTHER"
out=$(lxc list --format csv -c n 2>&1); [[ $out != *"$OTHER"* ]] && ok "lxc list after delete" || fail "lxc list after delete" "$out"
exit $FAILED
