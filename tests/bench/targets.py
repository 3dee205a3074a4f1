#!/usr/bin/env python3
"""Checks the throughput targets of BENCHMARKS.md with paired runs.

On a shared 2-core machine one run of a point can differ from the next by 25% or more, so a
ratio taken from two runs minutes apart says little. This script starts both services (as
tests/bench/run.py does), then for each target scenario alternates `health` and the scenario
at concurrency 64, --pairs times, and reports each pair's ratio, their median, and the share
of the CPU the hypervisor stole during each run (`steal`; see run.py).

  cargo build --release --bin directory-svc --bin billing-svc --bin loadgen
  python3 tests/bench/targets.py [--pairs 3] [--duration 5] [--backends sqlite,postgres]
      [--scenarios authorize,get-subscription,create-subscription,assign-license]

assign-license runs against fixture directories of USERS users each (one directory per run,
so every call of a run assigns a licence nobody holds yet; see `loadgen --help`).
"""
import argparse, os, statistics, sys, uuid

sys.path.insert(0, os.path.dirname(__file__))
import run  # noqa: E402  (the matrix script: starting services, loadgen, PostgreSQL helpers)

TARGETS = {"authorize": 0.60, "get-subscription": 0.35, "create-subscription": 0.15,
           "assign-license": 0.15}
USERS = 20000
PASSWORD = "Fixture-Pass-1"


def measure(backend, opts):
    dport, bport = 51061, 51062
    rows = []
    prefix = "tg" + uuid.uuid4().hex[:6]
    fixtures = None
    if "assign-license" in opts.scenarios.split(","):
        fixtures = ["--directories", str(opts.pairs), "--users-per-directory", str(USERS),
                    "--prefix", prefix, "--password", PASSWORD]
    runs = {"assign-license": 0}
    with run.service_pair(backend, "targets", dport, bport, fixtures):
        def rate(scenario):
            extra = []
            if scenario == "assign-license":
                extra = ["--user", f"admin@{prefix}{runs[scenario]}.onmicrosoft.com",
                         "--password", PASSWORD, "--users", str(USERS)]
                runs[scenario] += 1
            r = run.loadgen(["--scenario", scenario, "--directory", f"127.0.0.1:{dport}",
                             "--billing", f"127.0.0.1:{bport}", "-c", "64", "--connections", "4",
                             "--duration", str(opts.duration), "--warmup", "1"] + extra)
            if r["errors"]:
                raise SystemExit(f"{scenario}: errors {r['errors']}")
            return r["requests_per_sec"], r["steal_pct"]

        for scenario, target in TARGETS.items():
            if scenario not in opts.scenarios.split(","):
                continue
            ratios, steals = [], []
            for _ in range(opts.pairs):
                (base, base_steal), (got, got_steal) = rate("health"), rate(scenario)
                ratios.append(got / base)
                steals.append(max(base_steal, got_steal))
                print(f"{backend:9} {scenario:20} health {base:8.0f}/s  {scenario} {got:8.0f}/s  "
                      f"ratio {got / base:.1%}  steal {base_steal:.1f}% / {got_steal:.1f}%",
                      flush=True)
            median = statistics.median(ratios)
            rows.append((backend, scenario, target, ratios, median, max(steals)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--scenarios", default=",".join(TARGETS), help="a subset of the targets")
    opts = p.parse_args()
    rows = []
    for backend in opts.backends.split(","):
        rows += measure(backend, opts)
    # The worst steal of any run of the scenario's pairs: a pair whose runs the neighbours slowed
    # unevenly measures them, not the services.
    print("\n| backend | scenario | target | ratio of each pair (c=64) | median | max steal | status |")
    print("|---|---|---|---|---|---|---|")
    for backend, scenario, target, ratios, median, steal in rows:
        print(f"| {backend} | {scenario} | >= {target:.0%} | {', '.join(f'{r:.1%}' for r in ratios)} | "
              f"{median:.1%} | {steal:.1f}% | {'met' if median >= target else 'missed'} |")


if __name__ == "__main__":
    main()
