#!/usr/bin/env python3
"""How steady is this machine's CPU? Times one fixed unit of arithmetic, over and over, on each
core at once, with a short sleep between units, and reports how much longer than its fastest
run the unit took (median, p99, max) and the longest stretch of slow units.

On a shared VM a core can run at a fraction of its speed for tens of milliseconds, because
the host gives the physical core to someone else, without any of it showing as `steal` in
/proc/stat. Open-loop latency then measures the neighbours: a load that keeps 45% of the
machine busy needs 90-180% of it in such a stretch, and calls queue for as long as it lasts.
Run this before trusting a latency figure (BENCHMARKS.md, "Machine and setup": the Intel VM).

  python3 tests/bench/steady.py [--seconds 5] [--unit-ms 1]
"""
import argparse, multiprocessing, os, statistics, time

SLOW = 1.4  # a unit that takes this many times the median is slow


def unit(n):
    x = 1
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return x


def probe(cpu, iterations, seconds, out):
    os.sched_setaffinity(0, {cpu})
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        unit(iterations)
        times.append(time.perf_counter() - t0)
        time.sleep(0.0005)
    out.put((cpu, times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--unit-ms", type=float, default=1.0, help="the unit's length at full speed")
    opts = p.parse_args()
    if opts.seconds <= 0 or opts.unit_ms <= 0:
        p.error("--seconds and --unit-ms must be above 0")
    # Size the unit to about --unit-ms on this machine (the fastest of five tries).
    fastest = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        unit(20000)
        fastest = min(fastest, time.perf_counter() - t0)
    iterations = max(1000, int(20000 * opts.unit_ms / 1000 / fastest))
    out = multiprocessing.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    procs = [multiprocessing.Process(target=probe, args=(c, iterations, opts.seconds, out))
             for c in cpus]
    for proc in procs:
        proc.start()
    results = sorted(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    for cpu, times in results:
        best = min(times)
        median = statistics.median(times)
        times_sorted = sorted(times)
        p99 = times_sorted[int(len(times) * 0.99)]
        longest = run = 0
        for t in times:
            run = run + 1 if t > SLOW * median else 0
            longest = max(longest, run)
        print(f"cpu{cpu}: {len(times)} units of {best * 1000:.2f} ms at best: median "
              f"{median / best:.2f}x, p99 {p99 / best:.2f}x, max {max(times) / best:.1f}x; "
              f"longest run of slow units (> {SLOW}x the median): {longest}")


if __name__ == "__main__":
    main()
