#!/usr/bin/env bash
# Instructions per call of one service, counted by valgrind's callgrind: repeatable to a few
# tenths of a percent, whatever else the machine is doing, so two builds compare without the
# 25% run-to-run spread of throughput on a shared VM.
#
#   tests/bench/instructions.sh RELEASE_DIR SCENARIO [REQUESTS]
#
# RELEASE_DIR holds directory-svc, billing-svc and loadgen (a release build; to compare a
# commit, build it in a worktree: `git worktree add ../base REV && (cd ../base && cargo build
# --release --bin directory-svc --bin billing-svc --bin loadgen)`).
# SCENARIO: a loadgen scenario. Directory scenarios (authorize, get-user, whoami...) count
# directory-svc; billing scenarios (get-subscription, create-subscription...) count
# billing-svc, with directory-svc running natively behind it. SQLite, argon2 at its cheapest
# (set-up only), abuse limits off. The counters are zeroed after a 2,000-call warm-up, then
# REQUESTS calls (default 20,000) at concurrency 8 are counted.
set -euo pipefail

rel="$(cd "${1:?release dir}" && pwd)"
scenario="${2:?scenario}"
requests="${3:-20000}"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }

tmp="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

dport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
bport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cheap=(--signin-failures-per-upn-per-minute 0 --signin-per-peer-per-minute 0
       --signup-per-peer-per-minute 0 --argon2-memory-kib 64 --argon2-iterations 1)
wait_port() {
  for _ in $(seq 1 240); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.5; done
  echo "nothing listening on $1" >&2; exit 1
}
counted=(valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out")
case "$scenario" in
  health|authorize|get-user|list-users|whoami|sign-in)
    "${counted[@]}" "$rel/directory-svc" --listen "127.0.0.1:$dport" \
      --database-url "sqlite://$tmp/d.db" "${cheap[@]}" 2>"$tmp/services.log" &
    counted_pid=$!; pids+=("$counted_pid"); wait_port "$dport" ;;
  *)
    "$rel/directory-svc" --listen "127.0.0.1:$dport" --database-url "sqlite://$tmp/d.db" \
      "${cheap[@]}" 2>"$tmp/services.log" &
    pids+=("$!"); wait_port "$dport"
    "${counted[@]}" "$rel/billing-svc" --listen "127.0.0.1:$bport" \
      --database-url "sqlite://$tmp/b.db" --directory-url "http://127.0.0.1:$dport" \
      2>>"$tmp/services.log" &
    counted_pid=$!; pids+=("$counted_pid"); wait_port "$bport" ;;
esac

load() {
  "$rel/loadgen" --scenario "$scenario" --directory "127.0.0.1:$dport" \
    --billing "127.0.0.1:$bport" -c 8 --requests "$1" --json >"$tmp/loadgen.json"
}
load 2000
callgrind_control -z "$counted_pid" >/dev/null 2>&1
load "$requests"
callgrind_control -d "$counted_pid" >/dev/null 2>&1
dump="$(ls "$tmp"/cg.out.* | sort -V | tail -n 1)"
total="$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")"
echo "$scenario: $((total / requests)) instructions per call ($requests calls, $(basename "$rel") in $(dirname "$rel"))"
