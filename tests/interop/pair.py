"""Starts the real directory-svc and billing-svc binaries for the interop suite.

One pair per engine: both services on free loopback ports, each on a fresh database
(SQLite files in a temporary folder, or two new PostgreSQL databases that the services create
on first start and that are dropped afterwards), Prometheus metrics on, the directory's abuse
limits off. Their stdout and stderr go to one log file whose tail `ServicePair.tail()` returns.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432/postgres"
LIMITS_OFF = ["--signin-failures-per-upn-per-minute", "0",
              "--signin-per-peer-per-minute", "0",
              "--signup-per-peer-per-minute", "0"]
STARTUP_TIMEOUT_S = 60


def free_ports(n):
    """`n` distinct loopback ports nobody listens on right now (all held open while picking,
    so the kernel cannot hand out the same one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pg_url_for(admin_url, database):
    """`admin_url` with its database (the URL path) replaced by `database`."""
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def psql(admin_url, sql):
    subprocess.run(["psql", admin_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
                   check=True, capture_output=True, text=True)


class ServicePair:
    """Context manager: `with ServicePair("sqlite", "target/debug") as pair: ...`.

    Attributes once started: `directory_port`, `billing_port`, `directory_metrics_port`,
    `billing_metrics_port`, `directory` and `billing` (the targets `127.0.0.1:PORT`)."""

    def __init__(self, engine, bin_dir, pg_admin_url=None):
        if engine not in ("sqlite", "postgres"):
            raise ValueError(f"unknown engine {engine!r} (sqlite or postgres)")
        self.engine = engine
        self.bin_dir = os.path.abspath(bin_dir)
        self.pg_admin_url = pg_admin_url or os.environ.get("TEST_POSTGRES_URL", DEFAULT_PG_URL)
        self.tmp = None
        self.pg_databases = []
        self.procs = []
        self.log_path = None
        self._log = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        for name in ("directory-svc", "billing-svc"):
            path = os.path.join(self.bin_dir, name)
            if not os.access(path, os.X_OK):
                raise RuntimeError(f"{path} is missing or not executable (build it first)")
        self.tmp = tempfile.mkdtemp(prefix=f"interop-{self.engine}-")
        self.log_path = os.path.join(self.tmp, "services.log")
        self._log = open(self.log_path, "wb")
        if self.engine == "sqlite":
            directory_db = f"sqlite://{self.tmp}/directory.db"
            billing_db = f"sqlite://{self.tmp}/billing.db"
        else:
            suffix = uuid.uuid4().hex[:12]
            self.pg_databases = [f"interop_dir_{suffix}", f"interop_bill_{suffix}"]
            directory_db = pg_url_for(self.pg_admin_url, self.pg_databases[0])
            billing_db = pg_url_for(self.pg_admin_url, self.pg_databases[1])

        (self.directory_port, self.directory_metrics_port,
         self.billing_port, self.billing_metrics_port) = free_ports(4)
        self.directory = f"127.0.0.1:{self.directory_port}"
        self.billing = f"127.0.0.1:{self.billing_port}"

        self._spawn("directory-svc", [
            "--listen", self.directory, "--database-url", directory_db,
            "--metrics-listen", f"127.0.0.1:{self.directory_metrics_port}"] + LIMITS_OFF)
        self._wait_serving(self.directory, self.procs[-1])
        self._spawn("billing-svc", [
            "--listen", self.billing, "--database-url", billing_db,
            "--metrics-listen", f"127.0.0.1:{self.billing_metrics_port}",
            "--directory-url", f"http://{self.directory}"])
        self._wait_serving(self.billing, self.procs[-1])

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self._log:
            self._log.close()
            self._log = None
        for name in self.pg_databases:
            try:
                psql(self.pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except subprocess.CalledProcessError as e:
                print(f"warning: could not drop database {name}: {e.stderr.strip()}")
        self.pg_databases = []
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- helpers -----------------------------------------------------------------------------

    def tail(self, lines=60):
        """The last `lines` lines the services wrote (stdout and stderr, both services)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no service log)"
        if self._log:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def metrics_url(self, service):
        port = {"directory": self.directory_metrics_port,
                "billing": self.billing_metrics_port}[service]
        return f"http://127.0.0.1:{port}/metrics"

    def _spawn(self, name, args):
        self._log.write(f"==== {name} {' '.join(args)}\n".encode())
        self._log.flush()
        proc = subprocess.Popen([os.path.join(self.bin_dir, name)] + args,
                                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        proc.name = name
        self.procs.append(proc)

    def _wait_serving(self, target, proc):
        """Polls grpc.health.v1 Check("") until SERVING; fails fast if the process exits."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.returncode} while starting:\n"
                                       f"{self.tail()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} not SERVING after {STARTUP_TIMEOUT_S}s:\n"
                                       f"{self.tail()}")
                time.sleep(0.05)  # readiness polling
