#!/usr/bin/env node
// The OFFICIAL @x402/evm 2.27.0 batch-settlement client, through @x402/fetch, pays N calls of a
// URL over HTTP, then asks for a cooperative refund: prints ONE JSON line
//   {statuses, receipts, refund, channelId, refusals, error}
// where receipts[k] is the decoded PAYMENT-RESPONSE of call k, refund the client's
// SettleResponse of the refund (null with REFUND = "no-refund") and refusals the `error` of
// every 402 the server answered to a paid request (a corrective 402 the client recovered from
// shows here). The first call opens the channel with an EIP-3009 deposit of
// MULTIPLIER x amount (the client's depositPolicy); later calls send vouchers only; the client
// reads chargedAmount / channelState from each receipt (processPaymentResponse).
// A client that lost its state (a new process, in-memory storage) on an open channel recovers
// through the server's corrective 402 (processCorrectivePaymentRequired, inside @x402/fetch).
// Usage: node batch-pay.mjs KEY URL N RPC_URL [MULTIPLIER] [SALT] [refund|no-refund]
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const require = createRequire(join(DEPS, "node", "node_modules", "x.js"));
const { createPublicClient, http } = require("viem");
const { privateKeyToAccount } = require("viem/accounts");
const { wrapFetchWithPayment, x402Client } = require("@x402/fetch");
const bs = require("@x402/evm/batch-settlement/client");

const [key, url, n, rpcUrl, multiplier, salt, refund] = process.argv.slice(2);
if (!key || !url || !n || !rpcUrl) {
  console.error("usage: node batch-pay.mjs KEY URL N RPC_URL [MULTIPLIER] [SALT]");
  process.exit(2);
}
const decode = (v) => (v ? JSON.parse(Buffer.from(v, "base64").toString("utf8")) : null);
const out = { statuses: [], receipts: [], refund: null, channelId: null, refusals: [], error: null };
// Sees every exchange of the paying fetch: the 402s answered to a payment header.
async function recordingFetch(input, init) {
  const request = new Request(input, init);
  const paid = request.headers.has("PAYMENT-SIGNATURE");
  const res = await fetch(request);
  if (paid && res.status === 402) {
    out.refusals.push(decode(res.headers.get("payment-required"))?.error ?? null);
  }
  return res;
}
try {
  const account = privateKeyToAccount(key);
  // readContract: recovery and refunds read the channel on chain.
  const chain = createPublicClient({ transport: http(rpcUrl) });
  const signer = {
    address: account.address,
    signTypedData: (m) => account.signTypedData(m),
    readContract: (args) => chain.readContract(args),
  };
  const scheme = new bs.BatchSettlementEvmScheme(signer, {
    depositPolicy: { depositMultiplier: Number(multiplier ?? 5) },
    rpcUrl,
    salt: salt ?? "0x" + "00".repeat(32),
  });
  const client = new x402Client().register("eip155:84532", scheme);
  const pay = wrapFetchWithPayment(recordingFetch, client);
  for (let i = 0; i < Number(n); i++) {
    const res = await pay(url, { method: "GET", signal: AbortSignal.timeout(30000) });
    await res.text();
    out.statuses.push(res.status);
    out.receipts.push(decode(res.headers.get("payment-response")));
    if (res.status !== 200) break;
  }
  out.channelId = out.receipts[0]?.extra?.channelState?.channelId ?? null;
  if (refund !== "no-refund") out.refund = await scheme.refund(url);
} catch (e) {
  out.error = String(e?.stack || e?.message || e).split("\n").slice(0, 4).join(" | ");
}
process.stdout.write(JSON.stringify(out) + "\n");
process.exitCode = out.error ? 1 : 0;
