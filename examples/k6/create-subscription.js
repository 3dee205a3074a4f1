// Load test of billing.v1.BillingService/CreateSubscription: each iteration is a new
// purchase (a new request_id, so never an idempotent replay) of a repeatable offer, OFFER,
// default azure-pay-as-you-go (the free trial can be bought once per user; an Office 365
// offer is bought with 1 seat). Each purchase is authorised by directory-svc and written to
// billing's database, so this writes one subscription per iteration.
//
//   k6 run examples/k6/create-subscription.js                # 8 VUs, 30 s
//   k6 run --vus 16 --duration 1m -e OFFER=office365-e3 examples/k6/create-subscription.js
//
// setup() signs up a directory of its own and signs its admin in.
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { BILLING, bearer, connect, optionsFor, repeatableOffer, signUpAndSignIn, subscriptionChecks, uuid } from './lib.js';

export const options = optionsFor('create_subscription', 1000);

const client = new grpc.Client();

export function setup() {
  const s = signUpAndSignIn('buy');
  return Object.assign(s, { offer: repeatableOffer(__ENV.OFFER || 'azure-pay-as-you-go') });
}

export default function (s) {
  if (__ITER === 0) connect(client, BILLING);
  const displayName = `k6 vu${__VU} it${__ITER}`;
  const res = client.invoke(
    'billing.v1.BillingService/CreateSubscription',
    { offer_id: s.offer.id, display_name: displayName, seats: s.offer.seats, request_id: uuid() },
    bearer(s.token, 'create_subscription'),
  );
  check(res, Object.assign(
    subscriptionChecks('CreateSubscription', {
      offerId: s.offer.id, directoryId: s.directoryId, family: s.offer.family,
      ownerType: s.offer.ownerType, userId: s.adminId,
    }),
    {
      'CreateSubscription has the name and seats asked for': (r) =>
        r && r.message && r.message.displayName === displayName && (r.message.seats || 0) === s.offer.seats,
    },
  ));
}
