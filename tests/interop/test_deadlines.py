"""Deadlines on the directory server: a call whose deadline (grpc-timeout) expires before the
server is done is answered DEADLINE_EXCEEDED with an ErrorInfo, and counted as such."""
import collections
import time
import unittest

import grpc
from google.rpc import code_pb2

import support
from support import (DIRECTORY_SERVICE, PASSWORD, directory_pb2, grpc_frame, handled_total,
                     metric_samples, method_path, raw_call)

SIGN_IN = method_path(DIRECTORY_SERVICE, "SignIn")
METRICS_WAIT_S = 1


class ServerDeadlines(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()
        # A real sign-in: password hashing makes it take 10+ ms, longer than any deadline here.
        cls.request = directory_pb2.SignInRequest(user_principal_name=cls.world.admin_upn,
                                                  password=PASSWORD)

    def deadline_problem(self, answer):
        """Why `answer` is not a proper DEADLINE_EXCEEDED from the directory (None if it is)."""
        info = answer.error_info()
        if (answer.status == code_pb2.DEADLINE_EXCEEDED and info is not None
                and info.reason == "DEADLINE_EXCEEDED" and info.domain == "directory-svc"):
            return None
        return answer.describe()

    def raw_sign_in(self, grpc_timeout):
        return raw_call(self.world.pair.directory, SIGN_IN,
                        grpc_frame(self.request.SerializeToString()),
                        headers=[("grpc-timeout", grpc_timeout)])

    def test_one_nanosecond_deadline(self):
        problem = self.deadline_problem(self.raw_sign_in("1n"))
        self.assertIsNone(problem, "want DEADLINE_EXCEEDED with ErrorInfo(DEADLINE_EXCEEDED, "
                                   "directory-svc), never CANCELLED")

    def test_two_millisecond_deadline_20_times(self):
        answers = [self.raw_sign_in("2m") for _ in range(20)]
        problems = [p for p in map(self.deadline_problem, answers) if p]
        statuses = collections.Counter(a.status for a in answers)
        if problems:
            self.fail(f"{len(problems)} of 20 calls were not DEADLINE_EXCEEDED with an ErrorInfo "
                      f"(grpc-status counts: {dict(statuses)}); first: {problems[0]}")

    def test_grpcio_timeout_is_counted_as_deadline_exceeded(self):
        url = self.world.pair.metrics_url("directory")
        before = handled_total(metric_samples(url), SIGN_IN, "DEADLINE_EXCEEDED")
        calls = 5
        client_codes = collections.Counter()
        for _ in range(calls):
            try:
                self.world.directory.SignIn(self.request, timeout=0.002)
                client_codes["OK"] += 1
            except grpc.RpcError as e:
                client_codes[e.code().name] += 1
        # The server records a call when it finishes it, which may be just after the client
        # gave up: poll until all of them are counted (under either code). A call may also
        # expire in the client before it leaves, so fewer may ever reach the server.
        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            samples = metric_samples(url)
            exceeded = handled_total(samples, SIGN_IN, "DEADLINE_EXCEEDED") - before
            cancelled = handled_total(samples, SIGN_IN, "CANCELLED")
            if exceeded + cancelled >= calls or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # polling for the counters
        series = {labels["code"]: value for name, labels, value in samples
                  if name == "grpc_server_handled_total" and labels.get("method") == SIGN_IN}
        report = f"client saw {dict(client_codes)}; server's SignIn counters {series}"
        self.assertEqual(client_codes, {"DEADLINE_EXCEEDED": calls}, report)
        self.assertEqual(cancelled, 0, report)
        self.assertGreaterEqual(exceeded, 1, report)


if __name__ == "__main__":
    unittest.main()
