"""x-request-id: the caller's id comes back in the response's initial metadata (headers), a
call without one gets a generated UUID; an error answer (trailers only) carries it too."""
import unittest
import uuid

import grpc

import support
from support import CALL_TIMEOUT_S, auth, billing_pb2, directory_pb2


def metadata_value(pairs, key):
    return next((v for k, v in pairs or () if k == key), None)


class RequestIdEcho(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()

    def who_am_i(self, *extra):
        _, call = self.world.directory.WhoAmI.with_call(
            directory_pb2.WhoAmIRequest(), metadata=auth(self.world.token, *extra),
            timeout=CALL_TIMEOUT_S)
        return call

    def test_sent_id_is_echoed_in_initial_metadata(self):
        request_id = f"interop-{uuid.uuid4()}"
        call = self.who_am_i(("x-request-id", request_id))
        self.assertEqual(metadata_value(call.initial_metadata(), "x-request-id"), request_id,
                         f"initial {call.initial_metadata()} trailing {call.trailing_metadata()}")

    def test_missing_id_is_generated(self):
        call = self.who_am_i()
        generated = metadata_value(call.initial_metadata(), "x-request-id")
        self.assertIsNotNone(generated, call.initial_metadata())
        uuid.UUID(generated)  # a UUID

    def test_billing_echoes_the_id(self):
        request_id = f"interop-{uuid.uuid4()}"
        _, call = self.world.billing.ListOffers.with_call(
            billing_pb2.ListOffersRequest(), metadata=(("x-request-id", request_id),),
            timeout=CALL_TIMEOUT_S)
        self.assertEqual(metadata_value(call.initial_metadata(), "x-request-id"), request_id)

    def test_error_answer_echoes_the_id(self):
        # An error is sent trailers-only: grpcio shows those headers as trailing metadata.
        request_id = f"interop-{uuid.uuid4()}"
        with self.assertRaises(grpc.RpcError) as raised:
            self.world.directory.WhoAmI(directory_pb2.WhoAmIRequest(),
                                        metadata=(("x-request-id", request_id),),
                                        timeout=CALL_TIMEOUT_S)
        error = raised.exception
        self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(metadata_value(error.trailing_metadata(), "x-request-id"), request_id,
                         f"initial {error.initial_metadata()} trailing {error.trailing_metadata()}")


if __name__ == "__main__":
    unittest.main()
