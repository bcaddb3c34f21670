#!/bin/bash
# stop_cluster.sh DIR : SIGTERM each daemon of the cluster in DIR by its pid file, wait, SIGKILL
# after 10 s. Never by name: other clusters (and other people's daemons) may run on this host.
D=$(realpath -m "${1:?scratch dir}"); pids=""
for f in "$D"/pid/slurmd-n1.pid "$D"/pid/slurmd-n2.pid "$D"/pid/slurmctld.pid "$D"/munge/munged.pid; do
  [ -s "$f" ] || continue; p=$(cat "$f"); pids="$pids $p"; kill -TERM "$p" 2>/dev/null || true
done
for p in $pids; do
  for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$p" 2>/dev/null; then echo "pid $p ignored SIGTERM, SIGKILL" >&2; kill -KILL "$p"; fi
done
echo "stopped:$pids"
