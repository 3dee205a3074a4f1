"""Rich error details (google.rpc.Status in grpc-status-details-bin) as grpcio-status reads
them: ErrorInfo on every error, BadRequest naming each bad field."""
import re
import unittest

import grpc
from google.rpc import error_details_pb2

import support
from support import CALL_TIMEOUT_S, auth, billing_pb2, detail, directory_pb2, status_of

SCREAMING_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


class RichErrorDetails(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()

    def test_bad_purchase_names_every_bad_field(self):
        with self.assertRaises(grpc.RpcError) as raised:
            self.world.billing.CreateSubscription(
                billing_pb2.CreateSubscriptionRequest(offer_id="office365-e3", display_name="",
                                                      seats=0),
                metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        error = raised.exception
        self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
        status = status_of(error)
        self.assertIsNotNone(status, "no grpc-status-details-bin")
        bad_request = detail(status, error_details_pb2.BadRequest)
        self.assertIsNotNone(bad_request, status)
        fields = {v.field for v in bad_request.field_violations}
        self.assertEqual(fields, {"display_name", "seats"}, bad_request)
        info = detail(status, error_details_pb2.ErrorInfo)
        self.assertIsNotNone(info, status)
        self.assertRegex(info.reason, SCREAMING_SNAKE)
        self.assertEqual(info.domain, "billing-svc")

    def test_wrong_password_is_unauthenticated_with_error_info(self):
        with self.assertRaises(grpc.RpcError) as raised:
            self.world.directory.SignIn(directory_pb2.SignInRequest(
                user_principal_name=self.world.admin_upn, password="Wr0ng-Horse"),
                timeout=CALL_TIMEOUT_S)
        error = raised.exception
        self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertNotIn("Wr0ng-Horse", error.details())
        info = detail(status_of(error), error_details_pb2.ErrorInfo)
        self.assertIsNotNone(info, "no ErrorInfo")
        self.assertRegex(info.reason, SCREAMING_SNAKE)
        self.assertEqual(info.domain, "directory-svc")


if __name__ == "__main__":
    unittest.main()
