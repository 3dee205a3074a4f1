#!/usr/bin/env python3
"""Soak run: mixed load on both services for a long time, errors by code and RSS over time.

Starts release builds of directory-svc and billing-svc on fresh SQLite files (or PostgreSQL
with --backend postgres), then runs several loadgen processes at once, each an open-loop
scenario at a fixed rate, for --minutes, while sampling each service's RSS every 10 s.
Prints the loadgen reports and the RSS series as Markdown.

  cargo build --release --bin directory-svc --bin billing-svc --bin loadgen
  python3 tests/bench/soak.py --minutes 10
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time, uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REL = os.path.join(ROOT, "target", "release")
PG_ADMIN = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
MIX = [("authorize", 400), ("get-user", 200), ("list-users", 100), ("whoami", 100),
       ("create-subscription", 100), ("get-subscription", 200), ("list-subscriptions", 50),
       ("sign-in", 5)]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_port(port):
    import socket
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--backend", default="sqlite")
    opts = p.parse_args()
    seconds = int(opts.minutes * 60)
    tmp = tempfile.mkdtemp(prefix="soak-")
    names = None
    if opts.backend == "sqlite":
        ddb, bdb = f"sqlite://{tmp}/directory.db", f"sqlite://{tmp}/billing.db"
    else:
        s = uuid.uuid4().hex[:8]
        names = (f"soak_dir_{s}", f"soak_bill_{s}")
        base = PG_ADMIN.rsplit("/", 1)[0]
        ddb, bdb = f"{base}/{names[0]}", f"{base}/{names[1]}"
    log = open(os.path.join(tmp, "services.log"), "w")
    dport, bport = 52051, 52052
    off = ["--signin-failures-per-upn-per-minute", "0", "--signin-per-peer-per-minute", "0",
           "--signup-per-peer-per-minute", "0"]
    d = subprocess.Popen([os.path.join(REL, "directory-svc"), "--listen", f"127.0.0.1:{dport}",
                          "--database-url", ddb] + off, stdout=log, stderr=log)
    wait_port(dport)
    b = subprocess.Popen([os.path.join(REL, "billing-svc"), "--listen", f"127.0.0.1:{bport}",
                          "--database-url", bdb, "--directory-url", f"http://127.0.0.1:{dport}"],
                         stdout=log, stderr=log)
    wait_port(bport)
    samples = []
    stop = threading.Event()

    def sample():
        start = time.time()
        while not stop.is_set():
            samples.append((time.time() - start, rss_mib(d.pid), rss_mib(b.pid)))
            stop.wait(10)

    sampler = threading.Thread(target=sample)
    sampler.start()
    procs = []
    for scenario, rate in MIX:
        procs.append((scenario, rate, subprocess.Popen(
            [os.path.join(REL, "loadgen"), "--scenario", scenario, "--directory", f"127.0.0.1:{dport}",
             "--billing", f"127.0.0.1:{bport}", "--rate", str(rate), "-c", "64", "--duration", str(seconds),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    reports = []
    for scenario, rate, proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(f"{scenario}: loadgen failed: {err}", file=sys.stderr)
            continue
        reports.append((scenario, rate, json.loads(out)))
    stop.set()
    sampler.join()
    d.terminate(); b.terminate(); d.wait(); b.wait()
    log.close()
    if names:
        for n in names:
            subprocess.run(["psql", PG_ADMIN, "-q", "-c", f"DROP DATABASE IF EXISTS {n} WITH (FORCE)"])
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"### Soak: {opts.minutes:g} minutes, {opts.backend}\n")
    print("| scenario | target rate/s | requests | achieved/s | p50 ms | p99 ms | max ms | errors by code |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario, rate, r in reports:
        l = r["latency_us"]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        print(f"| {scenario} | {rate} | {r['requests']} | {r['requests_per_sec']:.0f} | {l['p50']/1000:.2f} | "
              f"{l['p99']/1000:.2f} | {l['max']/1000:.1f} | {errors} |")
    print("\nRSS over time (MiB):\n")
    print("| t (s) | directory | billing |")
    print("|---|---|---|")
    for i, (t, dr, br) in enumerate(samples):
        if i % 6 == 0 or i == len(samples) - 1:
            print(f"| {t:.0f} | {dr:.1f} | {br:.1f} |")


if __name__ == "__main__":
    main()
