#!/usr/bin/env python3
"""Where the CPU goes: CPU time per request of each process on the path of a scenario.

Starts both services (as tests/bench/run.py does), runs each scenario with the load generator
(closed loop at concurrency 64, or open loop at --rate), and reads each process's CPU time
(user + system, from /proc) before and after: directory-svc, billing-svc, PostgreSQL (every
`postgres` process: the backends serving the run and the server's own writers) and the load
generator itself. Dividing by the requests served gives microseconds of CPU per request, the
figure that bounds throughput on a machine whose cores are all busy: with 2 cores, at most
2,000,000 / (sum of the columns) requests per second.

  cargo build --release --bin directory-svc --bin billing-svc --bin loadgen
  python3 tests/bench/cost.py [--backends sqlite,postgres] [--scenarios health,get-subscription]
                              [--rate N] [--duration 5]
"""
import argparse, os, resource, subprocess, sys, time

sys.path.insert(0, os.path.dirname(__file__))
import run  # noqa: E402  (the matrix script: starting services, loadgen, PostgreSQL helpers)

HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0  # the process ended between listing and reading


def postgres_ticks():
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return sum(cpu_ticks(int(pid)) for pid in out.split())


def children_cpu_secs():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(backend, opts):
    dport, bport = 51081, 51082
    rows = []
    with run.service_pair(backend, "cost", dport, bport) as (directory, billing):
        for scenario in opts.scenarios.split(","):
            load = ["--rate", str(opts.rate)] if opts.rate else []
            before = (cpu_ticks(directory.pid), cpu_ticks(billing.pid), postgres_ticks(),
                      children_cpu_secs(), time.monotonic())
            r = run.loadgen(["--scenario", scenario, "--directory", f"127.0.0.1:{dport}",
                             "--billing", f"127.0.0.1:{bport}", "-c", "64", "--connections", "4",
                             "--duration", str(opts.duration), "--warmup", "1"] + load)
            after = (cpu_ticks(directory.pid), cpu_ticks(billing.pid), postgres_ticks(),
                     children_cpu_secs(), time.monotonic())
            if r["errors"]:
                raise SystemExit(f"{scenario}: errors {r['errors']}")
            # The CPU figures cover the warm-up and the set-up calls too: divide by the
            # requests the whole run would have served at the measured rate.
            requests = r["requests_per_sec"] * (after[4] - before[4])
            per = lambda i, scale: (after[i] - before[i]) * scale * 1e6 / requests  # noqa: E731
            pg = per(2, 1 / HZ) if backend == "postgres" else 0.0
            costs = [per(0, 1 / HZ), per(1, 1 / HZ), pg, per(3, 1)]
            rows.append((backend, scenario, r["requests_per_sec"], r["latency_us"]["p99"], costs))
            print(f"{backend:9} {scenario:20} {r['requests_per_sec']:8.0f}/s  CPU us/request: "
                  f"directory {costs[0]:5.1f}  billing {costs[1]:5.1f}  postgres {costs[2]:5.1f}  "
                  f"loadgen {costs[3]:5.1f}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--scenarios", default="health,authorize,get-subscription,create-subscription")
    p.add_argument("--rate", type=int, default=0, help="open loop at this rate (default: closed loop)")
    p.add_argument("--duration", type=int, default=5)
    opts = p.parse_args()
    rows = []
    for backend in opts.backends.split(","):
        rows += measure(backend, opts)
    load = f"open loop at {opts.rate}/s" if opts.rate else "closed loop, c=64"
    print(f"\n{load}; CPU microseconds per request")
    print("| backend | scenario | req/s | p99 ms | directory | billing | PostgreSQL | loadgen | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, scenario, rate, p99, costs in rows:
        print(f"| {backend} | {scenario} | {rate:.0f} | {p99 / 1000:.1f} | "
              + " | ".join(f"{c:.0f}" for c in costs) + f" | {sum(costs):.0f} |")


if __name__ == "__main__":
    main()
