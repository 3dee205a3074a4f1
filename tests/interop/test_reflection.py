"""Server reflection: grpcio-reflection's client (v1alpha) lists each server's services and
resolves a symbol; the same request over grpc.reflection.v1 is answered too."""
import unittest

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

import support
from support import BILLING_SERVICE, CALL_TIMEOUT_S, DIRECTORY_SERVICE

HEALTH = "grpc.health.v1.Health"
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class Reflection(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pair = support.pair()
        cls.channels = {name: support.channel(target) for name, target in
                        (("directory", cls.pair.directory), ("billing", cls.pair.billing))}

    @classmethod
    def tearDownClass(cls):
        for ch in cls.channels.values():
            ch.close()

    def services(self, server):
        return set(ProtoReflectionDescriptorDatabase(self.channels[server]).get_services())

    def test_directory_lists_its_service_and_health(self):
        self.assertLessEqual({DIRECTORY_SERVICE, HEALTH}, self.services("directory"))

    def test_billing_lists_its_service_and_health(self):
        self.assertLessEqual({BILLING_SERVICE, HEALTH}, self.services("billing"))

    def test_file_containing_directory_service(self):
        db = ProtoReflectionDescriptorDatabase(self.channels["directory"])
        file = db.FindFileContainingSymbol(DIRECTORY_SERVICE)
        self.assertEqual(file.package, "directory.v1")
        self.assertIn("DirectoryService", [s.name for s in file.service])
        methods = {m.name for s in file.service for m in s.method}
        self.assertLessEqual({"CreateDirectory", "SignIn", "WhoAmI", "Authorize"}, methods)

    def test_v1_reflection_answers_too(self):
        # v1 and v1alpha messages are the same on the wire: reuse the v1alpha classes.
        call = self.channels["directory"].stream_stream(
            V1_METHOD, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol=DIRECTORY_SERVICE)]
        answers = list(call(iter(requests), timeout=CALL_TIMEOUT_S))
        self.assertEqual(len(answers), 2, answers)
        listed = {s.name for s in answers[0].list_services_response.service}
        self.assertIn(DIRECTORY_SERVICE, listed)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in
                 answers[1].file_descriptor_response.file_descriptor_proto]
        self.assertIn("directory.v1", [f.package for f in files])


if __name__ == "__main__":
    unittest.main()
