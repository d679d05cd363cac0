#!/usr/bin/env node
// Pay an x402 `upto`-protected URL with the OFFICIAL JS client, unmodified, and print ONE JSON line
// (same shape as pay.mjs, plus the decoded payment payload):
//   {client, url, status, body, paymentResponse, paymentHeaderName, paymentHeader, paymentPayload,
//    replayStatus, replayBody, replayError, error}
// Usage: node upto.mjs URL [KEY] [--replay] [--timeout-ms 30000] [--rpc-url URL]
//    or: node upto.mjs --url URL [--key HEX] [--replay] [--timeout-ms N] [--rpc-url URL]
//   client: @x402/fetch wrapFetchWithPayment + an x402Client with @x402/evm/upto/client
//   UptoEvmScheme registered for eip155:84532, signing with a viem local account.
// What the client does (@x402/evm 2.27.0): on a 402 it picks the `upto` requirement, needs
//   `extra.facilitatorAddress` (it throws without it), and signs a Permit2
//   PermitWitnessTransferFrom for `amount` (the maximum) with spender = the x402 upto proxy
//   0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002, witness {to: payTo, facilitator, validAfter: 0},
//   deadline now + maxTimeoutSeconds and a random 256-bit nonce; pure local signing, no RPC.
//   The payer must have approved Permit2 on the token beforehand (tests: Chain::approve_permit2).
//   Only when the server's 402 declares the `eip2612GasSponsoring` or
//   `erc20ApprovalGasSponsoring` extension does the scheme try to read the payer's Permit2
//   allowance and sign an approval; a local account cannot read contracts, so without
//   --rpc-url those extensions are silently skipped. --rpc-url passes `{rpcUrl}` to
//   UptoEvmScheme so they can run (reads allowance/nonces on that RPC). Without it the
//   script talks to nothing but URL.
// --replay: afterwards, re-send the exact payment header the client sent with a plain fetch, to
//   check that the server refuses a replayed proof.
// Exit status: 0 iff the paid request ended with HTTP 200; 1 otherwise; 2 on usage errors.
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const ANVIL_1_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const NETWORK = "eip155:84532";
const BODY_LIMIT = 4000;

function usage(msg) {
  console.error(
    `upto.mjs: ${msg}\nusage: node upto.mjs URL [KEY] [--replay] [--timeout-ms N] [--rpc-url URL]\n` +
      `   or: node upto.mjs --url URL [--key HEX] [--replay] [--timeout-ms N] [--rpc-url URL]`,
  );
  process.exit(2);
}

const args = { url: "", key: "", replay: false, "timeout-ms": "30000", "rpc-url": "" };
const positional = [];
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (!argv[i].startsWith("--")) {
    positional.push(argv[i]);
    continue;
  }
  const k = argv[i].slice(2);
  if (!(k in args)) usage(`unknown argument ${argv[i]}`);
  if (typeof args[k] === "boolean") args[k] = true;
  else if (i + 1 < argv.length) args[k] = argv[++i];
  else usage(`--${k} needs a value`);
}
if (positional.length > 2) usage(`unexpected argument ${positional[2]}`);
if (positional[0]) args.url = args.url ? usage("URL given twice") : positional[0];
if (positional[1]) args.key = args.key ? usage("key given twice") : positional[1];
if (!args.url) usage("a URL is required");
if (!args.key) args.key = ANVIL_1_KEY;
if (!/^0x[0-9a-fA-F]{64}$/.test(args.key)) usage("the key must be 0x + 64 hex digits");
const timeoutMs = Number(args["timeout-ms"]);
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) usage("--timeout-ms must be a positive number");

const nodeDir = join(DEPS, "node");
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`upto.mjs: clients not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
  process.exit(2);
}
// CommonJS builds through one require(): a single consistent module graph for all packages.
const need = createRequire(join(nodeDir, "package.json"));

/** base64 (standard alphabet) JSON header value -> object, or null. */
function decodeB64Json(value) {
  if (!value) return null;
  try {
    return JSON.parse(Buffer.from(value, "base64").toString("utf8"));
  } catch {
    return null;
  }
}

const cut = (text) => (text.length > BODY_LIMIT ? text.slice(0, BODY_LIMIT) + "...(truncated)" : text);

/** The `error` of a 402: the PAYMENT-REQUIRED header first, then a JSON body. */
function challengeError(res, text) {
  let challenge = decodeB64Json(res.headers.get("payment-required"));
  if (!challenge) {
    try {
      challenge = JSON.parse(text);
    } catch {
      challenge = null;
    }
  }
  return challenge && challenge.error ? String(challenge.error) : null;
}

const out = {
  client: "js-v2-upto",
  url: args.url,
  status: null,
  body: null,
  paymentResponse: null,
  paymentHeaderName: null,
  paymentHeader: null,
  paymentPayload: null,
  replayStatus: null,
  replayBody: null,
  replayError: null,
  error: null,
};

// The client calls this instead of the global fetch, so we see exactly what goes on the wire,
// including the payment header of the paid retry (the last request that carried one wins).
async function recordingFetch(input, init) {
  const headers = new Request(input, init).headers;
  for (const name of ["PAYMENT-SIGNATURE", "X-PAYMENT"]) {
    const value = headers.get(name);
    if (value) {
      out.paymentHeaderName = name;
      out.paymentHeader = value;
      out.paymentPayload = decodeB64Json(value);
    }
  }
  return fetch(input, init);
}

function payingFetch() {
  const { privateKeyToAccount } = need("viem/accounts");
  const { wrapFetchWithPayment, x402Client } = need("@x402/fetch");
  const { UptoEvmScheme } = need("@x402/evm/upto/client");
  const account = privateKeyToAccount(args.key);
  const options = args["rpc-url"] ? { rpcUrl: args["rpc-url"] } : undefined;
  const client = new x402Client().register(NETWORK, new UptoEvmScheme(account, options));
  return wrapFetchWithPayment(recordingFetch, client);
}

async function run() {
  const res = await payingFetch()(args.url, { method: "GET", signal: AbortSignal.timeout(timeoutMs) });
  const text = await res.text();
  out.status = res.status;
  out.body = cut(text);
  out.paymentResponse = decodeB64Json(res.headers.get("payment-response") || res.headers.get("x-payment-response"));
  if (res.status === 402) out.error = challengeError(res, text);

  if (args.replay) {
    if (!out.paymentHeader) throw new Error("--replay: the client sent no payment header");
    const again = await fetch(args.url, {
      method: "GET",
      headers: { [out.paymentHeaderName]: out.paymentHeader },
      signal: AbortSignal.timeout(timeoutMs),
    });
    const againText = await again.text();
    out.replayStatus = again.status;
    out.replayBody = cut(againText);
    if (again.status === 402) out.replayError = challengeError(again, againText);
  }
}

try {
  await run();
} catch (e) {
  // undici's "fetch failed" hides the reason in `cause` (ECONNREFUSED, ...).
  const cause = e?.cause ? ` (cause: ${e.cause.code || e.cause.message || e.cause})` : "";
  out.error = (String(e?.stack || e?.message || e).split("\n").slice(0, 4).join(" | ") + cause).trim();
}
process.stdout.write(JSON.stringify(out) + "\n");
process.exitCode = out.status === 200 ? 0 : 1;
