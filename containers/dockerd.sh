#!/usr/bin/env bash
# Start, stop or query a private Docker daemon for image builds and container tests.
#
#   containers/dockerd.sh start    start one (no-op when its socket already answers); prints the DOCKER_HOST line
#   containers/dockerd.sh stop     stop the daemon this script started (pid file), wait for it to exit
#   containers/dockerd.sh status   exit 0 when the socket answers
#   containers/dockerd.sh env      print `export DOCKER_HOST=unix://...` (use with eval)
#   containers/dockerd.sh prune    remove untagged images and the BuildKit cache; tagged images stay, and
#                                  build.py skips an image whose inputs label matches, so nothing is rebuilt
#
# The daemon keeps its own data root, exec root and socket under INTERIORFUSION_DOCKERD_DIR
# (default /var/tmp/interiorfusion-dockerd) and leaves the host's network alone (--iptables=false
# --bridge=none): builds and containers must use `--network host` (or `--network none`).
# The data root persists between starts, so the layer cache survives a stop/start.
# Needs root and Debian's docker.io (`containers/ci-setup.sh` installs it).
set -euo pipefail

DIR="${INTERIORFUSION_DOCKERD_DIR:-/var/tmp/interiorfusion-dockerd}"
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
STORAGE_DRIVER="${INTERIORFUSION_DOCKERD_STORAGE_DRIVER:-overlay2}"
START_TIMEOUT="${INTERIORFUSION_DOCKERD_START_TIMEOUT:-60}"

answers() {
    # The engine's /_ping answers "OK" once the API is up; curl is not always present, so use python.
    [[ -S "$SOCK" ]] || return 1
    python3 - "$SOCK" <<'PY' >/dev/null 2>&1
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
sys.exit(0 if b"\r\n\r\nOK" in data else 1)
PY
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
    if answers; then
        echo "export DOCKER_HOST=unix://$SOCK"
        return 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd.sh: dockerd not found; run containers/ci-setup.sh (apt-get install docker.io)" >&2; exit 1; }
    [[ "$(id -u)" == 0 ]] || { echo "dockerd.sh: starting dockerd needs root" >&2; exit 1; }
    if pid="$(running_pid)"; then
        echo "dockerd.sh: dockerd (pid $pid) is running but $SOCK does not answer; see $LOG" >&2
        exit 1
    fi
    mkdir -p "$DIR/data" "$DIR/exec"
    rm -f "$SOCK" "$PIDFILE"
    # setsid: the daemon must not die with the shell (or pytest process group) that started it.
    setsid dockerd \
        --storage-driver="$STORAGE_DRIVER" \
        --data-root="$DIR/data" \
        --exec-root="$DIR/exec" \
        --host="unix://$SOCK" \
        --pidfile="$PIDFILE" \
        --iptables=false --ip-masq=false --bridge=none \
        >>"$LOG" 2>&1 </dev/null &
    local i
    for ((i = 0; i < START_TIMEOUT * 2; i++)); do
        if answers; then
            echo "export DOCKER_HOST=unix://$SOCK"
            return 0
        fi
        sleep 0.5
    done
    echo "dockerd.sh: dockerd did not answer on $SOCK within ${START_TIMEOUT}s; last log lines:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
}

stop() {
    local pid i
    if ! pid="$(running_pid)"; then
        echo "dockerd.sh: no dockerd running from $DIR" >&2
        return 0
    fi
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "dockerd.sh: stopped dockerd (pid $pid)" >&2
            unmount_leftovers
            return 0
        fi
        sleep 0.5
    done
    echo "dockerd.sh: dockerd (pid $pid) still running after 30 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
    unmount_leftovers
}

unmount_leftovers() {
    # dockerd leaves its network-namespace bind mount (exec root) and the data root mount behind; unmount
    # them, deepest first, so the state directory can be removed.
    local mnt
    awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done
}

prune() {
    # Every commit rebuilds the images whose project wheels changed; the replaced images and their build
    # cache (gigabytes each: a torch environment) would otherwise pile up on a machine that keeps this data
    # root across runs until its disk is full.
    answers || { echo "dockerd.sh: no dockerd answering on $SOCK" >&2; return 1; }
    DOCKER_HOST="unix://$SOCK" docker image prune -f >/dev/null
    DOCKER_HOST="unix://$SOCK" docker builder prune -af >/dev/null 2>&1  # legacy builder: only a deprecation notice
    echo "dockerd.sh: pruned; $(du -sh "$DIR/data" 2>/dev/null | cut -f1) in $DIR/data" >&2
}

case "${1:-}" in
start) start ;;
prune) prune ;;
stop) stop ;;
status) answers ;;
env) echo "export DOCKER_HOST=unix://$SOCK" ;;
*)
    echo "usage: $0 start|stop|status|env|prune" >&2
    exit 2
    ;;
esac
