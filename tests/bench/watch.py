#!/usr/bin/env python3
"""The change feed under load (the BENCHMARKS.md "Change feeds" table).

For each backend, directory-svc on a fresh database:
  1. `loadgen watch --streams S --rate R --duration D`: S streams at now, R writes a second;
     every change must reach every stream in order, and the delivery latency (from the start
     of each write's call to each stream's receipt) is reported;
  2. then, the service stopped, a backlog of --backlog changes written by
     `loadgen fixtures --changes` (through the service's own outbox code), the service
     started again, and `loadgen watch --replay`: one stream (the service token) reads every
     change kept;
directory-svc's RSS is sampled every 100 ms during each (the peaks are reported) and at idle.

  cargo build --release --bin directory-svc --bin loadgen
  python3 tests/bench/watch.py [--backends sqlite,postgres] [--streams 1000] [--rate 10]
      [--duration 30] [--backlog 1000000]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time, uuid

sys.path.insert(0, os.path.dirname(__file__))
import run  # noqa: E402  (starting services, PostgreSQL helpers, RSS)


class Peak:
    """Samples a process's RSS every 100 ms until stopped; keeps the largest."""

    def __init__(self, pid):
        self.pid, self.kib, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.stop.is_set():
            try:
                self.kib = max(self.kib, run.rss_kib(self.pid))
            except OSError:
                return
            time.sleep(0.1)

    def done(self):
        self.stop.set()
        self.thread.join()
        return self.kib


def loadgen(args):
    out = subprocess.run([os.path.join(run.REL, "loadgen")] + args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loadgen {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def serve(ddb, token_file, port, log):
    directory = run.start("directory-svc", ["--listen", f"127.0.0.1:{port}", "--database-url", ddb,
                                            "--service-token-file", token_file] + run.LIMITS_OFF, log)
    run.wait_port(port)
    time.sleep(1)
    return directory


def stop(directory):
    directory.terminate()
    directory.wait()


def measure(backend, opts):
    """The live run on a fresh database, then the backlog loaded into it and replayed (a
    bulk load leaves work behind, a SQLite WAL to checkpoint, that a live run after it would
    measure instead of the feed)."""
    tmp = tempfile.mkdtemp(prefix="watch-")
    name = None
    if backend == "sqlite":
        ddb = f"sqlite://{tmp}/directory.db"
    else:
        name = f"watch_{uuid.uuid4().hex[:8]}"
        ddb = run.pg_db(name)
    token_file = os.path.join(tmp, "service-token")
    result = {"backend": backend}
    directory = None
    log = open(os.path.join(tmp, "service.log"), "w")
    target = f"127.0.0.1:{opts.port}"
    try:
        directory = serve(ddb, token_file, opts.port, log)
        result["rss_idle_kib"] = run.rss_kib(directory.pid)
        peak = Peak(directory.pid)
        result["live"] = json.loads(loadgen([
            "watch", "--directory", target, "--streams", str(opts.streams), "--rate",
            str(opts.rate), "--duration", str(opts.duration), "--json"]))
        result["rss_live_peak_kib"] = peak.done()
        stop(directory)
        directory = None

        started = time.monotonic()
        loadgen(["fixtures", "--directories", "1", "--users-per-directory", "1",
                 "--changes", str(opts.backlog), "--directory-db", ddb,
                 "--argon2-memory-kib", "64", "--argon2-iterations", "1"])
        result["backlog_load_s"] = time.monotonic() - started
        if backend == "postgres":
            subprocess.run(["psql", ddb, "-q", "-c", "VACUUM ANALYZE changes"],
                           check=True, capture_output=True)
        subprocess.run(["sync"], check=True)
        directory = serve(ddb, token_file, opts.port, log)
        peak = Peak(directory.pid)
        # The live run's changes and the backlog.
        kept = opts.backlog + int(result["live"]["writes"]) + 3
        result["replay"] = json.loads(loadgen([
            "watch", "--directory", target, "--replay", str(kept),
            "--service-token-file", token_file, "--json"]))
        result["rss_replay_peak_kib"] = peak.done()
    finally:
        if directory:
            stop(directory)
        log.close()
        if name:
            run.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=50151)
    opts = parser.parse_args()
    results = [measure(b, opts) for b in opts.backends.split(",")]
    os.makedirs(os.path.join(run.ROOT, "target", "bench"), exist_ok=True)
    with open(os.path.join(run.ROOT, "target", "bench", "watch.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("| backend | streams with every change | delivery p50 / p99 / max | RSS idle / live peak | replay of the backlog | RSS replay peak |")
    print("|---|---|---|---|---|---|")
    for r in results:
        live, replay = r["live"], r["replay"]
        lat = live["latency_ms"]
        print(f"| {r['backend']} | {live['streams_complete']}/{live['streams']} "
              f"({live['writes']} writes, {live['deliveries']:,} deliveries) | "
              f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} ms | "
              f"{r['rss_idle_kib'] / 1024:.1f} / {r['rss_live_peak_kib'] / 1024:.1f} MiB | "
              f"{replay['changes']:,} in {replay['seconds']:.1f} s: {replay['changes_per_second']:,.0f}/s | "
              f"{r['rss_replay_peak_kib'] / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()
