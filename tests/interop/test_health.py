"""grpc.health.v1 Health.Watch: a stream whose first message is the current status, SERVING."""
import unittest

from grpc_health.v1 import health_pb2, health_pb2_grpc

import support
from support import BILLING_SERVICE, CALL_TIMEOUT_S, DIRECTORY_SERVICE


class HealthWatch(unittest.TestCase):

    def first_watch_message(self, target, service):
        with support.channel(target) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            try:
                return next(stream).status
            finally:
                stream.cancel()

    def test_directory_watch_starts_with_serving(self):
        status = self.first_watch_message(support.pair().directory, DIRECTORY_SERVICE)
        self.assertEqual(status, health_pb2.HealthCheckResponse.SERVING)

    def test_billing_watch_starts_with_serving(self):
        status = self.first_watch_message(support.pair().billing, BILLING_SERVICE)
        self.assertEqual(status, health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    unittest.main()
