// Load test of billing.v1.BillingService/GetSubscription: the admin reads the subscription
// it bought (billing authorises each read through the directory service).
//
//   k6 run examples/k6/get-subscription.js                   # 8 VUs, 30 s
//   k6 run --vus 16 --duration 1m -e DIRECTORY=host:port -e BILLING=host:port examples/k6/get-subscription.js
//
// setup() signs up a directory of its own, signs its admin in and buys one subscription
// (OFFER, default azure-pay-as-you-go); every iteration reads it back.
import grpc from 'k6/net/grpc';
import { check, fail } from 'k6';
import { BILLING, bearer, connect, optionsFor, repeatableOffer, signUpAndSignIn, subscriptionChecks, uuid } from './lib.js';

export const options = optionsFor('get_subscription', 500);

const client = new grpc.Client();

export function setup() {
  const s = signUpAndSignIn('get');
  const offer = repeatableOffer(__ENV.OFFER || 'azure-pay-as-you-go');
  const c = new grpc.Client();
  connect(c, BILLING);
  const res = c.invoke(
    'billing.v1.BillingService/CreateSubscription',
    { offer_id: offer.id, display_name: 'k6 get-subscription', seats: offer.seats, request_id: uuid() },
    { metadata: { authorization: `Bearer ${s.token}` }, tags: { call: 'setup' } },
  );
  c.close();
  if (!res || res.status !== grpc.StatusOK) {
    fail(`setup: CreateSubscription failed: status ${res && res.status}: ${JSON.stringify(res && res.error)}`);
  }
  return Object.assign(s, { subscriptionId: res.message.id, offer });
}

export default function (s) {
  if (__ITER === 0) connect(client, BILLING);
  const res = client.invoke(
    'billing.v1.BillingService/GetSubscription',
    { subscription_id: s.subscriptionId },
    bearer(s.token, 'get_subscription'),
  );
  check(res, Object.assign(
    subscriptionChecks('GetSubscription', {
      offerId: s.offer.id, directoryId: s.directoryId, family: s.offer.family,
      ownerType: s.offer.ownerType, userId: s.adminId,
    }),
    {
      'GetSubscription returns the subscription asked for': (r) =>
        r && r.message && r.message.id === s.subscriptionId && r.message.displayName === 'k6 get-subscription',
    },
  ));
}
