"""Shared pieces of the interop suite: the running service pair and its seeded data (`world()`),
grpcio channels and stubs, google.rpc error details, Prometheus parsing and a raw HTTP/2 gRPC
client (the `h2` library) for checks grpcio hides (headers, the compressed flag, grpc-timeout).

The pair is started once per process: by suite.py (one engine per process), or lazily on first
use when a test module is run directly (`INTEROP_ENGINE`, `INTEROP_BIN` in the environment).
"""
import atexit
import base64
import gzip
import os
import re
import socket
import struct
import sys
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GEN = os.environ.get("INTEROP_GEN", os.path.join(ROOT, "target", "interop", "gen"))
if GEN not in sys.path:
    sys.path.insert(0, GEN)

import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from billing.v1 import billing_pb2, billing_pb2_grpc  # noqa: E402
from directory.v1 import directory_pb2, directory_pb2_grpc  # noqa: E402
from pair import ServicePair  # noqa: E402

DIRECTORY_SERVICE = "directory.v1.DirectoryService"
BILLING_SERVICE = "billing.v1.BillingService"
PASSWORD = "Corr3ct-Horse"
CALL_TIMEOUT_S = 30  # generous deadline for calls that are not about deadlines
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

# --- the pair and its seeded data ------------------------------------------------------------

_pair = None
_world = None


def use_pair(pair):
    """Called by suite.py with the pair it started for this engine."""
    global _pair
    _pair = pair


def pair():
    """The running service pair (started lazily when a test module runs on its own)."""
    global _pair
    if _pair is None:
        engine = os.environ.get("INTEROP_ENGINE", "sqlite")
        bin_dir = os.environ.get("INTEROP_BIN", os.path.join(ROOT, "target", "debug"))
        _pair = ServicePair(engine, bin_dir).__enter__()
        atexit.register(_pair.stop)
    return _pair


def channel(target, **kwargs):
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS, **kwargs)


def auth(token, *extra):
    """Call metadata carrying the bearer token (and any extra pairs)."""
    return (("authorization", f"Bearer {token}"),) + tuple(extra)


def unique_prefix(tag):
    """A fresh domain prefix (2..=32 of a-z 0-9) for this run."""
    return f"{tag}{uuid.uuid4().hex}"[:32]


def sign_up(stub, tag):
    """Creates a directory with a Global Administrator; returns (upn, access token)."""
    prefix = unique_prefix(tag)
    stub.CreateDirectory(directory_pb2.CreateDirectoryRequest(
        display_name=f"Interop {tag}", domain_prefix=prefix, admin_user_name="admin",
        admin_display_name="Interop Admin", admin_password=PASSWORD), timeout=CALL_TIMEOUT_S)
    upn = f"admin@{prefix}.onmicrosoft.com"
    token = stub.SignIn(directory_pb2.SignInRequest(user_principal_name=upn, password=PASSWORD),
                        timeout=CALL_TIMEOUT_S).access_token
    return upn, token


class World:
    """What most tests share: one signed-up directory, its Global Administrator's token, and
    one Azure subscription bought by that administrator."""

    def __init__(self, pair):
        self.pair = pair
        self.directory_channel = channel(pair.directory)
        self.billing_channel = channel(pair.billing)
        self.directory = directory_pb2_grpc.DirectoryServiceStub(self.directory_channel)
        self.billing = billing_pb2_grpc.BillingServiceStub(self.billing_channel)
        self.admin_upn, self.token = sign_up(self.directory, "interop")
        self.subscription = self.billing.CreateSubscription(
            billing_pb2.CreateSubscriptionRequest(offer_id="azure-pay-as-you-go",
                                                  display_name="Interop Azure"),
            metadata=auth(self.token), timeout=CALL_TIMEOUT_S)


def world():
    global _world
    if _world is None:
        _world = World(pair())
    return _world


# --- google.rpc error details ----------------------------------------------------------------

def status_of(error):
    """The google.rpc.Status of a failed grpcio call (None when it carries no details)."""
    return rpc_status.from_call(error)


def detail(status, message_type):
    """The first detail of `status` of the given type (ErrorInfo, BadRequest...), or None."""
    if status is None:
        return None
    for any_detail in status.details:
        if any_detail.Is(message_type.DESCRIPTOR):
            out = message_type()
            any_detail.Unpack(out)
            return out
    return None


# --- Prometheus metrics ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(url):
    """[(name, {label: value}, float)] from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = {k: v.replace('\\"', '"').replace("\\\\", "\\")
                      for k, v in _LABEL.findall(m.group(2) or "")}
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def handled_total(samples, method, code):
    """grpc_server_handled_total for one method and code (0 when the series is absent)."""
    return sum(v for name, labels, v in samples
               if name == "grpc_server_handled_total"
               and labels.get("method") == method and labels.get("code") == code)


# --- raw HTTP/2 gRPC client ------------------------------------------------------------------

def grpc_frame(payload, compressed=False):
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length, payload."""
    return struct.pack(">BI", 1 if compressed else 0, len(payload)) + payload


class RawResponse:
    """What a raw call received: response headers, the gRPC messages as (flag, bytes) and
    the trailers (for a trailers-only answer, the headers hold the status)."""

    def __init__(self, headers, body, trailers, reset):
        self.headers = headers
        self.trailers = trailers
        self.reset = reset  # RST_STREAM error code, or None
        self.messages = []
        while len(body) >= 5:
            flag, length = struct.unpack(">BI", body[:5])
            self.messages.append((flag, body[5:5 + length]))
            body = body[5 + length:]
        self.leftover = body

    def _meta(self, key):
        return self.trailers.get(key, self.headers.get(key))

    @property
    def status(self):
        value = self._meta("grpc-status")
        return int(value) if value is not None else None

    @property
    def message(self):
        return urllib.parse.unquote(self._meta("grpc-message") or "")

    @property
    def details(self):
        """google.rpc.Status from grpc-status-details-bin, or None."""
        raw = self._meta("grpc-status-details-bin")
        if raw is None:
            return None
        status = status_pb2.Status()
        status.ParseFromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        return status

    def error_info(self):
        return detail(self.details, error_details_pb2.ErrorInfo)

    def payload(self, index=0):
        """The index-th message, gunzipped when its compressed flag is set."""
        flag, data = self.messages[index]
        return gzip.decompress(data) if flag else data

    def describe(self):
        return (f"status={self.status} message={self.message!r} headers={self.headers} "
                f"trailers={self.trailers} reset={self.reset} "
                f"flags={[f for f, _ in self.messages]} error_info={self.error_info()}")


def raw_call(target, path, body, headers=(), timeout_s=30):
    """One unary gRPC call over a new h2c (prior knowledge) connection. `body` is the whole
    request body (use grpc_frame); `headers` are extra request headers. Returns RawResponse."""
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    try:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", target), ("content-type", "application/grpc"),
                                   ("te", "trailers")] + list(headers))
        conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        response_headers, trailers, data, reset = {}, {}, bytearray(), None
        done = False
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{target} closed the connection mid-call")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response_headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    reset, done = event.error_code, True
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"{target} sent GOAWAY: {event}")
            sock.sendall(conn.data_to_send())
        return RawResponse(response_headers, bytes(data), trailers, reset)
    finally:
        sock.close()


def method_path(service, method):
    return f"/{service}/{method}"
