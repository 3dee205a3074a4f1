"""Compression (gRPC's grpc-encoding / grpc-accept-encoding) and the server's answers to
requests it cannot read: unsupported encodings, unknown methods, malformed messages."""
import gzip
import unittest

import grpc
from google.rpc import code_pb2

import support
from support import (CALL_TIMEOUT_S, DIRECTORY_SERVICE, PASSWORD, auth,
                     billing_pb2, billing_pb2_grpc, directory_pb2, directory_pb2_grpc,
                     grpc_frame, method_path, raw_call)

COMPRESSION_THRESHOLD = 1024  # the server compresses messages of at least this many bytes


class _CompressedChannel:
    """Directory and billing calls through a grpcio channel that compresses every request
    (grpc-encoding set on the channel): the server must read them as if uncompressed."""
    compression = None

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()
        cls.directory_channel = support.channel(cls.world.pair.directory,
                                                compression=cls.compression)
        cls.billing_channel = support.channel(cls.world.pair.billing, compression=cls.compression)
        cls.directory = directory_pb2_grpc.DirectoryServiceStub(cls.directory_channel)
        cls.billing = billing_pb2_grpc.BillingServiceStub(cls.billing_channel)

    @classmethod
    def tearDownClass(cls):
        cls.directory_channel.close()
        cls.billing_channel.close()

    def test_sign_in(self):
        answer = self.directory.SignIn(directory_pb2.SignInRequest(
            user_principal_name=self.world.admin_upn, password=PASSWORD), timeout=CALL_TIMEOUT_S)
        self.assertTrue(answer.access_token)
        self.assertEqual(answer.user.user_principal_name, self.world.admin_upn)

    def test_who_am_i(self):
        answer = self.directory.WhoAmI(directory_pb2.WhoAmIRequest(),
                                       metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        self.assertEqual(answer.user.user_principal_name, self.world.admin_upn)

    def test_authorize(self):
        answer = self.directory.Authorize(
            directory_pb2.AuthorizeRequest(action=directory_pb2.ACTION_PURCHASE_SUBSCRIPTION),
            metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        self.assertTrue(answer.allowed, answer.reason)

    def test_get_subscription(self):
        answer = self.billing.GetSubscription(
            billing_pb2.GetSubscriptionRequest(subscription_id=self.world.subscription.id),
            metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        self.assertEqual(answer.id, self.world.subscription.id)

    def test_create_subscription_with_a_compressible_request(self):
        # A long, repetitive display name: big enough that the channel really compresses it.
        name = ("Contoso " * 32).strip()
        answer = self.billing.CreateSubscription(
            billing_pb2.CreateSubscriptionRequest(offer_id="office365-e3", display_name=name,
                                                  seats=5),
            metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        self.assertEqual(answer.display_name, name)
        self.assertEqual(answer.seats, 5)


class GzipChannel(_CompressedChannel, unittest.TestCase):
    """Requests compressed with gzip are answered like uncompressed ones."""
    compression = grpc.Compression.Gzip


class DeflateChannel(_CompressedChannel, unittest.TestCase):
    """Requests compressed with deflate are answered like uncompressed ones."""
    compression = grpc.Compression.Deflate


class RawCompression(unittest.TestCase):
    """What goes over the wire, seen with a raw HTTP/2 client."""

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()
        # A directory of its own with ~30 users whose long display names make one ListUsers
        # page far larger than the compression threshold.
        stub = cls.world.directory
        cls.upn, cls.token = support.sign_up(stub, "iocompress")
        domain = cls.upn.split("@", 1)[1]
        futures = [stub.CreateUser.future(directory_pb2.CreateUserRequest(
            user_principal_name=f"user{i:02}@{domain}",
            display_name=f"User {i:02} " + "with a deliberately long display name " * 5,
            password=PASSWORD), metadata=auth(cls.token), timeout=CALL_TIMEOUT_S)
            for i in range(30)]
        for f in futures:
            f.result()

    def call(self, method, request, *headers):
        """A raw directory call as this class's administrator, with extra headers."""
        return raw_call(self.world.pair.directory, method_path(DIRECTORY_SERVICE, method),
                        grpc_frame(request.SerializeToString()), headers=auth(self.token) + headers)

    def test_large_response_is_gzipped_when_the_client_accepts_gzip(self):
        answer = self.call("ListUsers", directory_pb2.ListUsersRequest(page_size=100),
                           ("grpc-accept-encoding", "gzip"))
        self.assertEqual(answer.status, 0, answer.describe())
        self.assertEqual(answer.headers.get("grpc-encoding"), "gzip", answer.describe())
        self.assertEqual(len(answer.messages), 1, answer.describe())
        self.assertEqual(answer.messages[0][0], 1, "compressed flag of a large response")
        users = directory_pb2.ListUsersResponse.FromString(answer.payload()).users
        self.assertEqual(len(users), 31)
        self.assertGreaterEqual(len(answer.payload()), COMPRESSION_THRESHOLD)

    def test_small_response_is_not_compressed(self):
        # Below the threshold gzip saves nothing: the flag stays 0 even when gzip is accepted.
        answer = self.call("WhoAmI", directory_pb2.WhoAmIRequest(),
                           ("grpc-accept-encoding", "gzip"))
        self.assertEqual(answer.status, 0, answer.describe())
        self.assertEqual(len(answer.messages), 1, answer.describe())
        flag, data = answer.messages[0]
        self.assertLess(len(data), COMPRESSION_THRESHOLD)
        self.assertEqual(flag, 0, "compressed flag of a small response")
        self.assertEqual(directory_pb2.WhoAmIResponse.FromString(data).user.user_principal_name,
                         self.upn)

    def test_gzip_compressed_request_frame_is_read(self):
        # A frame with the compressed flag set and a gzip body, whatever grpcio would choose.
        request = directory_pb2.SignInRequest(user_principal_name=self.upn, password=PASSWORD)
        answer = raw_call(self.world.pair.directory, method_path(DIRECTORY_SERVICE, "SignIn"),
                          grpc_frame(gzip.compress(request.SerializeToString()), compressed=True),
                          headers=[("grpc-encoding", "gzip")])
        self.assertEqual(answer.status, 0, answer.describe())
        self.assertTrue(directory_pb2.SignInResponse.FromString(answer.payload()).access_token)

    def test_unsupported_encoding_is_unimplemented_with_reason(self):
        answer = self.call("WhoAmI", directory_pb2.WhoAmIRequest(), ("grpc-encoding", "br"))
        self.assertEqual(answer.status, code_pb2.UNIMPLEMENTED, answer.describe())
        info = answer.error_info()
        self.assertIsNotNone(info, answer.describe())
        self.assertEqual(info.reason, "UNSUPPORTED_ENCODING")
        self.assertRegex(answer.message, r"\bbr\b")  # names the encoding it cannot read

    def test_unknown_method_is_unimplemented_with_reason(self):
        path = f"/{DIRECTORY_SERVICE}/NoSuchMethod"
        answer = raw_call(self.world.pair.directory, path, grpc_frame(b""))
        self.assertEqual(answer.status, code_pb2.UNIMPLEMENTED, answer.describe())
        info = answer.error_info()
        self.assertIsNotNone(info, answer.describe())
        self.assertEqual(info.reason, "METHOD_NOT_FOUND")
        self.assertIn(path, answer.message)

    def test_malformed_message_is_invalid_argument_with_reason(self):
        answer = raw_call(self.world.pair.directory, method_path(DIRECTORY_SERVICE, "SignIn"),
                          grpc_frame(b"\xff\xff\xff"))
        self.assertEqual(answer.status, code_pb2.INVALID_ARGUMENT, answer.describe())
        info = answer.error_info()
        self.assertIsNotNone(info, answer.describe())
        self.assertEqual(info.reason, "MALFORMED_MESSAGE")


if __name__ == "__main__":
    unittest.main()
