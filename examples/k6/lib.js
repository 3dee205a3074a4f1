// Shared helpers for the k6 scripts in this folder: addresses, sign-up and sign-in for
// setup(), and the checks every script makes. Schemas come from the servers' reflection, so
// no .proto files are needed.
import grpc from 'k6/net/grpc';
import { fail } from 'k6';

export const DIRECTORY = __ENV.DIRECTORY || '127.0.0.1:50051';
export const BILLING = __ENV.BILLING || '127.0.0.1:50052';

const PASSWORD = 'Corr3ct-Horse-k6';

// Default run: 8 VUs for 30 s, unless --vus/--duration (or K6_VUS/K6_DURATION, or
// --iterations, --stage...) say otherwise; k6 gives those precedence over these defaults.
// Thresholds: no failed check at all, and a lenient p99 bound on the measured call only
// (the setup calls, sign-up with its Argon2 hash included, are tagged apart).
export function optionsFor(call, p99Ms) {
  return {
    vus: 8,
    duration: '30s',
    thresholds: {
      checks: ['rate==1'],
      [`grpc_req_duration{call:${call}}`]: [`p(99)<${p99Ms}`],
    },
  };
}

export function connect(client, addr) {
  client.connect(addr, { plaintext: true, reflect: true, timeout: '10s' });
}

export function bearer(token, call) {
  return { metadata: { authorization: `Bearer ${token}` }, tags: { call } };
}

// A UUID v4 for request_id (Web Crypto is a global in k6 >= 1.0).
export function uuid() {
  if (typeof crypto !== 'undefined' && typeof crypto.randomUUID === 'function') {
    return crypto.randomUUID();
  }
  return 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'.replace(/[xy]/g, (c) => {
    const r = (Math.random() * 16) | 0;
    return (c === 'x' ? r : (r & 0x3) | 0x8).toString(16);
  });
}

// A fresh domain prefix: 2..=32 of a-z 0-9 (the contract's rule), unique per run.
export function domainPrefix(tag) {
  const rand = Math.random().toString(36).slice(2, 8).padEnd(6, '0');
  return `k6${tag}${Date.now().toString(36)}${rand}`.toLowerCase().replace(/[^a-z0-9]/g, '').slice(0, 32);
}

function mustOk(res, what) {
  if (!res || res.status !== grpc.StatusOK) {
    const err = res && res.error ? JSON.stringify(res.error) : 'no response';
    fail(`setup: ${what} failed: status ${res && res.status}: ${err}`);
  }
  return res.message;
}

// Signs up a new directory with its Global Administrator and signs the admin in.
// Returns { token, directoryId, adminId, upn, domain }.
export function signUpAndSignIn(tag) {
  const client = new grpc.Client();
  connect(client, DIRECTORY);
  const prefix = domainPrefix(tag);
  const created = mustOk(
    client.invoke(
      'directory.v1.DirectoryService/CreateDirectory',
      {
        display_name: `k6 ${tag} ${prefix}`,
        domain_prefix: prefix,
        admin_user_name: 'admin',
        admin_display_name: 'k6 admin',
        admin_password: PASSWORD,
      },
      { tags: { call: 'setup' } },
    ),
    'CreateDirectory',
  );
  const upn = created.admin.userPrincipalName;
  const signedIn = mustOk(
    client.invoke(
      'directory.v1.DirectoryService/SignIn',
      { user_principal_name: upn, password: PASSWORD },
      { tags: { call: 'setup' } },
    ),
    'SignIn',
  );
  client.close();
  if (!signedIn.accessToken) fail('setup: SignIn returned no access token');
  return {
    token: signedIn.accessToken,
    directoryId: created.directory.id,
    adminId: created.admin.id,
    upn,
    domain: created.directory.initialDomain,
  };
}

// The offer to buy, looked up in the catalogue (ListOffers): it must exist and be one that
// may be bought again and again (the free trial is once per user). Returns { id, seats }.
export function repeatableOffer(offerId) {
  if (offerId === 'azure-free-trial') {
    fail('setup: azure-free-trial can be bought once per user; pick a repeatable offer');
  }
  const client = new grpc.Client();
  connect(client, BILLING);
  const offers = mustOk(
    client.invoke('billing.v1.BillingService/ListOffers', {}, { tags: { call: 'setup' } }),
    'ListOffers',
  ).offers || [];
  client.close();
  const offer = offers.find((o) => o.id === offerId);
  if (!offer) fail(`setup: no offer ${offerId}; the catalogue has ${offers.map((o) => o.id).join(', ')}`);
  return { id: offer.id, seats: offer.perSeat ? 1 : 0, family: offer.productFamily, ownerType: offer.ownerType };
}

// Checks a Subscription message against what was bought.
export function subscriptionChecks(prefix, want) {
  const c = {};
  c[`${prefix} status is OK`] = (r) => r && r.status === grpc.StatusOK;
  c[`${prefix} has an id`] = (r) => r && r.message && typeof r.message.id === 'string' && r.message.id.length === 36;
  c[`${prefix} has the offer, directory and owner`] = (r) =>
    r && r.message &&
    r.message.offerId === want.offerId &&
    r.message.directoryId === want.directoryId &&
    r.message.productFamily === want.family &&
    r.message.ownerType === want.ownerType &&
    (want.ownerType === 'OWNER_TYPE_USER' ? r.message.ownerUserId === want.userId : !r.message.ownerUserId);
  c[`${prefix} is active, created by the admin, with a create_time`] = (r) =>
    r && r.message &&
    r.message.state === 'SUBSCRIPTION_STATE_ACTIVE' &&
    r.message.createdByUserId === want.userId &&
    typeof r.message.createTime === 'string' && r.message.createTime.length > 0;
  return c;
}
