"""Billing spends the caller's deadline on its call to the directory: a short but sufficient
budget succeeds, one that runs out is DEADLINE_EXCEEDED (never UNAVAILABLE), and a purchase
whose deadline ran out writes nothing."""
import collections
import unittest
import uuid

import grpc
from google.rpc import code_pb2

import support
from support import (BILLING_SERVICE, CALL_TIMEOUT_S, auth, billing_pb2, grpc_frame,
                     method_path, raw_call)

CALLS_PER_BUDGET = 20


class BillingUsesTheCallersBudget(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.world = support.world()

    def get_subscription(self, timeout):
        return self.world.billing.GetSubscription(
            billing_pb2.GetSubscriptionRequest(subscription_id=self.world.subscription.id),
            metadata=auth(self.world.token), timeout=timeout)

    def test_short_budgets_succeed_or_exceed_never_unavailable(self):
        self.get_subscription(CALL_TIMEOUT_S)  # warm-up: connections open, caches filled
        outcomes, examples = {}, {}  # budget -> Counter of code names; code -> one message
        for budget in (0.003, 0.005, 0.008):
            codes = outcomes[budget] = collections.Counter()
            for _ in range(CALLS_PER_BUDGET):
                try:
                    self.get_subscription(budget)
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
                    examples.setdefault(e.code().name, e.details())
        problems = [f"budget {budget}s: {codes[code]} {code}" for budget, codes in outcomes.items()
                    for code in codes if code not in ("OK", "DEADLINE_EXCEEDED")]
        if outcomes[0.008]["OK"] < 15:
            problems.append(f"budget 0.008s: only {outcomes[0.008]['OK']} of 20 succeeded")
        if problems:
            self.fail(f"{'; '.join(problems)} (outcomes per budget: "
                      f"{ {b: dict(c) for b, c in outcomes.items()} }; "
                      f"a message per code: {examples})")

    def test_purchase_whose_deadline_ran_out_is_deadline_exceeded_and_writes_nothing(self):
        name = f"Interop expired {uuid.uuid4().hex[:8]}"
        request = billing_pb2.CreateSubscriptionRequest(offer_id="azure-pay-as-you-go",
                                                        display_name=name)
        answer = raw_call(self.world.pair.billing, method_path(BILLING_SERVICE,
                                                                "CreateSubscription"),
                          grpc_frame(request.SerializeToString()),
                          headers=auth(self.world.token) + (("grpc-timeout", "1u"),))
        self.assertEqual(answer.status, code_pb2.DEADLINE_EXCEEDED, answer.describe())
        info = answer.error_info()
        self.assertIsNotNone(info, answer.describe())
        self.assertEqual(info.reason, "DEADLINE_EXCEEDED")
        listed = self.world.billing.ListSubscriptions(
            billing_pb2.ListSubscriptionsRequest(page_size=1000),
            metadata=auth(self.world.token), timeout=CALL_TIMEOUT_S)
        self.assertNotIn(name, [s.display_name for s in listed.subscriptions])


if __name__ == "__main__":
    unittest.main()
