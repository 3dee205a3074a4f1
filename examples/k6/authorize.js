// Load test of directory.v1.DirectoryService/Authorize, the call billing makes for every
// purchase and read: a signed-in Global Administrator asks whether it may buy a subscription.
//
//   k6 run examples/k6/authorize.js                          # 8 VUs, 30 s, 127.0.0.1:50051
//   k6 run --vus 16 --duration 1m -e DIRECTORY=host:port examples/k6/authorize.js
//
// setup() signs up a directory of its own (a fresh domain prefix per run) and signs its admin
// in; every iteration sends that token as `authorization: Bearer <token>`.
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { DIRECTORY, bearer, connect, optionsFor, signUpAndSignIn } from './lib.js';

export const options = optionsFor('authorize', 500);

const client = new grpc.Client();

export function setup() {
  return signUpAndSignIn('authz');
}

export default function (s) {
  if (__ITER === 0) connect(client, DIRECTORY);
  const res = client.invoke(
    'directory.v1.DirectoryService/Authorize',
    { action: 'ACTION_PURCHASE_SUBSCRIPTION' },
    bearer(s.token, 'authorize'),
  );
  check(res, {
    'Authorize status is OK': (r) => r && r.status === grpc.StatusOK,
    'Authorize allows the Global Administrator to purchase': (r) =>
      r && r.message && r.message.allowed === true && typeof r.message.reason === 'string',
    'Authorize names the user and the directory': (r) =>
      r && r.message && r.message.userId === s.adminId && r.message.directoryId === s.directoryId,
    'Authorize returns the roles as stored': (r) =>
      r && r.message && Array.isArray(r.message.roles) &&
      r.message.roles.includes('ROLE_GLOBAL_ADMINISTRATOR'),
  });
}
