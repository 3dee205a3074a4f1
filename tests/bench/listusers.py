#!/usr/bin/env python3
"""ListUsers page cost at 1,000 vs 1,000,000 users (the BENCHMARKS.md table).

For each backend and directory size: a fresh database, one directory of N users bulk-loaded
with `loadgen fixtures` (timed), then directory-svc started on it and pages of 100 read as
the directory's admin at concurrency 1 (one connection) and 16 (four), after a warm-up. After
the load and before the service starts, the new rows are vacuumed (PostgreSQL) and the files
synced, as after any bulk load: otherwise the run measures autovacuum and writeback.
Prints a Markdown table with each size's cost relative to the smallest (c=1 requests/s).

  cargo build --release --bin directory-svc --bin loadgen
  python3 tests/bench/listusers.py [--sizes 1000,1000000] [--backends sqlite,postgres] [--duration 5]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time, uuid

sys.path.insert(0, os.path.dirname(__file__))
import run  # noqa: E402  (starting services, loadgen, PostgreSQL helpers)

PASSWORD = "Corr3ct-Horse-1"


def measure(backend, users, opts):
    tmp = tempfile.mkdtemp(prefix="listusers-")
    prefix = "lu" + uuid.uuid4().hex[:6]
    name = None
    if backend == "sqlite":
        ddb = f"sqlite://{tmp}/directory.db"
    else:
        name = f"listusers_{uuid.uuid4().hex[:8]}"
        ddb = run.pg_db(name)
    directory = None
    log = open(os.path.join(tmp, "service.log"), "w")
    try:
        started = time.monotonic()
        load = subprocess.run([os.path.join(run.REL, "loadgen"), "fixtures", "--directories", "1",
                               "--users-per-directory", str(users), "--directory-db", ddb,
                               "--prefix", prefix, "--password", PASSWORD],
                              capture_output=True, text=True)
        if load.returncode != 0:
            raise SystemExit(f"fixtures failed:\n{load.stderr}")
        load_secs = time.monotonic() - started
        # What an operator does after a bulk load, so the run does not share the 2 cores with
        # the aftermath: PostgreSQL's autovacuum of the new rows (and their hint bits), the
        # kernel's writeback of the files just written.
        if name:
            subprocess.run(["psql", ddb, "-q", "-c", "VACUUM (ANALYZE) users"], check=True,
                           capture_output=True)
        subprocess.run(["sync"], check=True)
        port = 51091
        directory = run.start("directory-svc", ["--listen", f"127.0.0.1:{port}",
                                                "--database-url", ddb] + run.LIMITS_OFF, log)
        run.wait_port(port)
        row = {"backend": backend, "users": users, "load_secs": load_secs}
        for c, connections in ((1, 1), (16, 4)):
            r = run.loadgen(["--scenario", "list-users", "--directory", f"127.0.0.1:{port}",
                             "--user", f"admin@{prefix}0.onmicrosoft.com", "--password", PASSWORD,
                             "--page-size", "100", "-c", str(c), "--connections", str(connections),
                             "--duration", str(opts.duration), "--warmup", "1"])
            if r["errors"]:
                raise SystemExit(f"list-users c={c}: errors {r['errors']}")
            row[c] = (r["requests_per_sec"], r["latency_us"]["p50"] / 1000)
        print(f"{backend:9} {users:>9} users: loaded in {load_secs:.1f} s; c=1 {row[1][0]:.0f}/s "
              f"p50 {row[1][1]:.2f} ms; c=16 {row[16][0]:.0f}/s p50 {row[16][1]:.2f} ms", flush=True)
        return row
    finally:
        if directory:
            directory.terminate()
            directory.wait()
        log.close()
        if name:
            run.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,1000000")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--duration", type=int, default=5)
    opts = p.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    rows = []
    for backend in opts.backends.split(","):
        rows += [measure(backend, users, opts) for users in sizes]
    print("\n| backend | users in the directory | loaded in s | c=1 req/s | p50 ms | c=16 req/s "
          "| p50 ms | cost vs smallest (c=1) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        smallest = next(r for r in rows if r["backend"] == row["backend"])
        cost = smallest[1][0] / row[1][0]
        print(f"| {row['backend']} | {row['users']:,} | {row['load_secs']:.1f} | {row[1][0]:.0f} | "
              f"{row[1][1]:.2f} | {row[16][0]:.0f} | {row[16][1]:.2f} | {cost:.2f}x |")


if __name__ == "__main__":
    main()
