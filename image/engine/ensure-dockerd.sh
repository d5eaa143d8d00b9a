#!/bin/sh
# Start dockerd in the background if `docker info` does not answer, then wait until it does.
# Idempotent: does nothing when a daemon already answers. Needs root.
# Env: DOCKERD_LOG (default /var/log/dockerd.log), DOCKERD_WAIT (seconds, default 60).
set -eu
LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
WAIT=${DOCKERD_WAIT:-60}

if docker info >/dev/null 2>&1; then
    echo "ensure-dockerd: dockerd already answers"
    exit 0
fi
command -v dockerd >/dev/null 2>&1 || { echo "ensure-dockerd: dockerd not installed (apt-get install docker.io)" >&2; exit 1; }

# A daemon may be starting already (pidfile present and process alive): then only wait.
if [ -s /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    echo "ensure-dockerd: dockerd (pid $(cat /var/run/docker.pid)) is starting; waiting"
else
    nohup dockerd >>"$LOG" 2>&1 </dev/null &
    echo "ensure-dockerd: started dockerd pid $! (log $LOG)"
fi

i=0
while ! docker info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt "$WAIT" ]; then
        echo "ensure-dockerd: dockerd did not answer within ${WAIT}s; see $LOG" >&2
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    sleep 1
done
echo "ensure-dockerd: dockerd answers after ${i}s"
