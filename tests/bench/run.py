#!/usr/bin/env python3
"""Runs the benchmark matrix of BENCHMARKS.md with the project's own load generator.

For each backend (SQLite, PostgreSQL): starts release builds of directory-svc and billing-svc
on fresh databases (abuse limits off, argon2 at its production default), runs every scenario
at concurrency 1, 16 and 64 (closed loop), measures each service's RSS idle and right after
the concurrency-64 load, and prints Markdown tables with each scenario's ratio to the `health`
baseline measured in the same run, and the share of the machine's CPU time the hypervisor
stole during each run (`steal`: on a shared VM, a run with high steal measures the neighbours).
Raw results go to target/bench/results-<backend>.json.

  cargo build --release --bin directory-svc --bin billing-svc --bin loadgen
  python3 tests/bench/run.py [--duration 5] [--warmup 1] [--backends sqlite,postgres]
"""
import argparse, contextlib, json, os, shutil, subprocess, sys, tempfile, time, uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REL = os.path.join(ROOT, "target", "release")
PG_ADMIN = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
SCENARIOS = ["health", "authorize", "get-user", "list-users", "whoami",
             "create-subscription", "get-subscription", "list-subscriptions"]
CONCURRENCY = [1, 16, 64]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start(binary, args, log):
    proc = subprocess.Popen([os.path.join(REL, binary)] + args, stdout=log, stderr=log)
    return proc


def wait_port(port, timeout=30):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def cpu_ticks():
    """The machine's CPU time by state since boot (the first line of /proc/stat): user, nice,
    system, idle, iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_pct(before, after):
    """The share of CPU time the hypervisor gave to other guests between two cpu_ticks(): on a
    shared VM, the runs where it is high measure the neighbours, not the code."""
    spent = [b - a for a, b in zip(before, after)]
    return 100.0 * spent[7] / max(1, sum(spent[:8]))


def loadgen(args):
    """Runs the load generator; its JSON result, plus `steal_pct` during the run."""
    before = cpu_ticks()
    out = subprocess.run([os.path.join(REL, "loadgen")] + args + ["--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loadgen {' '.join(args)} failed:\n{out.stderr}")
    result = json.loads(out.stdout)
    result["steal_pct"] = steal_pct(before, cpu_ticks())
    return result


def pg_db(name):
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{name}"


def psql(sql):
    subprocess.run(["psql", PG_ADMIN, "-q", "-c", sql], check=True, capture_output=True)


LIMITS_OFF = ["--signin-failures-per-upn-per-minute", "0", "--signin-per-peer-per-minute", "0",
              "--signup-per-peer-per-minute", "0"]


@contextlib.contextmanager
def service_pair(backend, prefix, dport, bport, fixtures=None):
    """Both services on fresh databases (abuse limits off), stopped and dropped on exit.
    With `fixtures` (arguments of `loadgen fixtures`), the directory's database is loaded
    with them first. Yields (directory, billing) processes."""
    tmp = tempfile.mkdtemp(prefix=f"{prefix}-")
    if backend == "sqlite":
        ddb, bdb, names = f"sqlite://{tmp}/directory.db", f"sqlite://{tmp}/billing.db", ()
    else:
        suffix = uuid.uuid4().hex[:8]
        names = (f"{prefix}_dir_{suffix}", f"{prefix}_bill_{suffix}")
        ddb, bdb = pg_db(names[0]), pg_db(names[1])
    log = open(os.path.join(tmp, "services.log"), "w")
    if fixtures:
        load = subprocess.run([os.path.join(REL, "loadgen"), "fixtures", "--directory-db", ddb]
                              + fixtures, capture_output=True, text=True)
        if load.returncode != 0:
            raise SystemExit(f"fixtures failed:\n{load.stderr}")
        subprocess.run(["sync"], check=True)
    directory = start("directory-svc", ["--listen", f"127.0.0.1:{dport}", "--database-url", ddb] + LIMITS_OFF, log)
    billing = None
    try:
        wait_port(dport)
        billing = start("billing-svc", ["--listen", f"127.0.0.1:{bport}", "--database-url", bdb,
                                        "--directory-url", f"http://127.0.0.1:{dport}"], log)
        wait_port(bport)
        yield directory, billing
    finally:
        for proc in (directory, billing):
            if proc:
                proc.terminate()
                proc.wait()
        log.close()
        for n in names:
            psql(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)


def run_backend(backend, opts):
    tmp = tempfile.mkdtemp(prefix="bench-")
    if backend == "sqlite":
        ddb, bdb = f"sqlite://{tmp}/directory.db", f"sqlite://{tmp}/billing.db"
    else:
        suffix = uuid.uuid4().hex[:8]
        names = (f"bench_dir_{suffix}", f"bench_bill_{suffix}")
        ddb, bdb = pg_db(names[0]), pg_db(names[1])
    dport, bport = 51051, 51052
    log = open(os.path.join(tmp, "services.log"), "w")
    if fixtures:
        load = subprocess.run([os.path.join(REL, "loadgen"), "fixtures", "--directory-db", ddb]
                              + fixtures, capture_output=True, text=True)
        if load.returncode != 0:
            raise SystemExit(f"fixtures failed:\n{load.stderr}")
        subprocess.run(["sync"], check=True)
    directory = start("directory-svc", ["--listen", f"127.0.0.1:{dport}", "--database-url", ddb,
                                        "--db-max-connections", str(opts.pool)] + LIMITS_OFF, log)
    billing = None
    try:
        wait_port(dport)
        billing = start("billing-svc", ["--listen", f"127.0.0.1:{bport}", "--database-url", bdb,
                                        "--directory-url", f"http://127.0.0.1:{dport}",
                                        "--db-max-connections", str(opts.pool)], log)
        wait_port(bport)
    except BaseException:
        for proc in (directory, billing):
            if proc:
                proc.kill()
        log.close()
        with open(os.path.join(tmp, "services.log")) as f:
            sys.stderr.write(f.read()[-4000:])
        raise
    time.sleep(1)
    results = {"backend": backend, "runs": [], "rss_kib": {}}
    results["rss_kib"]["idle"] = {"directory": rss_kib(directory.pid), "billing": rss_kib(billing.pid)}
    try:
        for scenario in SCENARIOS:
            for c in CONCURRENCY:
                r = loadgen(["--scenario", scenario, "--directory", f"127.0.0.1:{dport}",
                             "--billing", f"127.0.0.1:{bport}", "-c", str(c),
                             "--connections", str(min(c, opts.connections)),
                             "--duration", str(opts.duration), "--warmup", str(opts.warmup)])
                r["backend"] = backend
                results["runs"].append(r)
                print(f"{backend:9} {scenario:20} c={c:<3} {r['requests_per_sec']:9.0f}/s "
                      f"p50={r['latency_us']['p50']/1000:.2f}ms p99={r['latency_us']['p99']/1000:.2f}ms "
                      f"errors={r['errors']}", flush=True)
                if c == 64:
                    rss = results["rss_kib"].setdefault("after_c64", {})
                    rss[scenario] = {"directory": rss_kib(directory.pid), "billing": rss_kib(billing.pid)}
            # Open loop at half the best closed-loop rate: the latency a service shows when it
            # is busy but not saturated (calls start on schedule; queueing counts).
            best = max(r["requests_per_sec"] for r in results["runs"] if r["scenario"] == scenario)
            rate = max(1, int(best / 2))
            r = loadgen(["--scenario", scenario, "--directory", f"127.0.0.1:{dport}",
                         "--billing", f"127.0.0.1:{bport}", "-c", "512",
                         "--connections", str(opts.connections), "--rate", str(rate),
                         "--duration", str(opts.duration), "--warmup", str(opts.warmup)])
            r["backend"], r["best_closed_loop"] = backend, best
            results.setdefault("half_rate", []).append(r)
            print(f"{backend:9} {scenario:20} open loop {rate}/s: p50={r['latency_us']['p50']/1000:.2f}ms "
                  f"p99={r['latency_us']['p99']/1000:.2f}ms errors={r['errors']}", flush=True)
        # The baseline again at the end: the ratios divide by the faster of the two runs, so a
        # slow first run cannot flatter them.
        for c in CONCURRENCY:
            r = loadgen(["--scenario", "health", "--directory", f"127.0.0.1:{dport}", "-c", str(c),
                         "--connections", str(min(c, opts.connections)),
                         "--duration", str(opts.duration), "--warmup", str(opts.warmup)])
            r["backend"], r["repeat"] = backend, True
            results["runs"].append(r)
            print(f"{backend:9} {'health (again)':20} c={c:<3} {r['requests_per_sec']:9.0f}/s", flush=True)
        for c in [1, 16]:
            r = loadgen(["--scenario", "sign-in", "--directory", f"127.0.0.1:{dport}", "-c", str(c),
                         "--duration", str(opts.duration), "--warmup", str(opts.warmup)])
            r["backend"] = backend
            results["runs"].append(r)
            print(f"{backend:9} {'sign-in':20} c={c:<3} {r['requests_per_sec']:9.0f}/s "
                  f"p50={r['latency_us']['p50']/1000:.2f}ms p99={r['latency_us']['p99']/1000:.2f}ms", flush=True)
    finally:
        directory.terminate(); billing.terminate()
        directory.wait(); billing.wait()
        log.close()
        if backend == "postgres":
            for n in names:
                psql(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "bench", f"results-{backend}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def table(results):
    runs = results["runs"]
    base = {}
    for r in runs:
        if r["scenario"] == "health":
            base[r["concurrency"]] = max(base.get(r["concurrency"], 0), r["requests_per_sec"])
    lines = ["| scenario | c | req/s | vs health | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | steal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("repeat"):
            continue
        l = r["latency_us"]
        ratio = r["requests_per_sec"] / base[r["concurrency"]] if r["concurrency"] in base else float("nan")
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['scenario']} | {r['concurrency']} | {r['requests_per_sec']:.0f} | {ratio:.0%} | "
                     f"{l['p50']/1000:.2f} | {l['p90']/1000:.2f} | {l['p99']/1000:.2f} | {l['p99_9']/1000:.2f} | "
                     f"{l['max']/1000:.1f} | {errors} | {r['steal_pct']:.0f}% |")
    lines.append("")
    lines.append("Open loop at half of each scenario's best closed-loop rate (target: p99 <= 5 ms):")
    lines.append("")
    lines.append("| scenario | best closed-loop req/s | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | errors | steal | p99 <= 5 ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results.get("half_rate", []):
        l = r["latency_us"]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['scenario']} | {r['best_closed_loop']:.0f} | {r['rate']:.0f} | {r['requests_per_sec']:.0f} | "
                     f"{l['p50']/1000:.2f} | {l['p99']/1000:.2f} | {l['p99_9']/1000:.2f} | {errors} | "
                     f"{r['steal_pct']:.0f}% | {'yes' if l['p99'] <= 5000 else 'no'} |")
    rss = results["rss_kib"]
    lines.append("")
    lines.append(f"RSS idle: directory {rss['idle']['directory']/1024:.1f} MiB, billing {rss['idle']['billing']/1024:.1f} MiB; "
                 "after each concurrency-64 run (directory / billing, MiB): " +
                 "; ".join(f"{s} {v['directory']/1024:.1f} / {v['billing']/1024:.1f}" for s, v in rss.get("after_c64", {}).items()))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--backends", default="sqlite,postgres")
    opts = p.parse_args()
    for tool in ["directory-svc", "billing-svc", "loadgen"]:
        if not os.path.exists(os.path.join(REL, tool)):
            raise SystemExit(f"build first: target/release/{tool} is missing")
    for backend in opts.backends.split(","):
        results = run_backend(backend, opts)
        print(f"\n### {backend}\n")
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
