"""Runs the interop tests against one engine: starts the service pair, runs every test_*.py of
this folder (or the tests named on the command line), prints which ones failed with the tail
of the services' log, and exits non-zero on any failure.

  python suite.py --engine sqlite --bin target/debug [test_compression.GzipChannel ...]
"""
import argparse
import os
import re
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import support  # noqa: E402
from pair import ServicePair  # noqa: E402

EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failure)\b")


def summary(trace, limit=500):
    """One line from a traceback: the exception line and what follows it (a grpcio error's
    status and details, an assertion's message)."""
    lines = trace.strip().splitlines()
    start = max((i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)), default=0)
    text = " | ".join(line.strip() for line in lines[start:] if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, choices=["sqlite", "postgres"])
    parser.add_argument("--bin", default=os.path.join(support.ROOT, "target", "debug"))
    parser.add_argument("tests", nargs="*", help="test names (module[.Class[.test]])")
    opts = parser.parse_args()
    tag = f"[{opts.engine}]"

    loader = unittest.TestLoader()
    suite = (loader.loadTestsFromNames(opts.tests) if opts.tests
             else loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE))

    started = time.monotonic()
    try:
        pair = ServicePair(opts.engine, opts.bin).__enter__()
    except Exception as e:  # noqa: BLE001 - a pair that cannot start fails the engine
        print(f"{tag} FAILED TO START the service pair: {e}", flush=True)
        print(f"{opts.engine}: 0 passed, {suite.countTestCases()} failed", flush=True)
        return 1
    try:
        support.use_pair(pair)
        print(f"{tag} directory-svc at {pair.directory}, billing-svc at {pair.billing} "
              f"(bin {pair.bin_dir})", flush=True)
        result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
        problems = result.failures + result.errors + [
            (t, "unexpected success") for t in result.unexpectedSuccesses]
        if problems:
            print(f"\n{tag} ---- last lines of the services' log ({pair.log_path}) ----")
            print(pair.tail())
    finally:
        pair.stop()

    # Count tests (a subtest's failure belongs to its test), list every problem.
    failed_ids = {getattr(test, "test_case", test).id() for test, _ in problems}
    for test, trace in sorted(problems, key=lambda p: p[0].id()):
        print(f"{tag} FAILED {test.id()}: {summary(trace)}")
    passed = result.testsRun - len(failed_ids) - len(result.skipped)
    print(f"{tag} finished in {time.monotonic() - started:.1f}s", flush=True)
    print(f"{opts.engine}: {passed} passed, {len(failed_ids)} failed", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
