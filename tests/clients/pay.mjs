#!/usr/bin/env node
// Pay an x402-protected URL with an official JS client and print ONE JSON line (read by
// tests/interop.rs):
//   {client, url, status, body, paymentResponse, paymentHeaderName, paymentHeader,
//    replayStatus, replayBody, replayError, error}
// Usage: node pay.mjs --client v2|v1 --url URL [--key HEX] [--replay] [--timeout-ms 30000]
//   v2  @x402/fetch wrapFetchWithPayment + @x402/evm registerExactEvmScheme
//   v1  legacy x402-fetch wrapFetchWithPayment with a viem wallet client on baseSepolia
// --replay: afterwards, re-send the exact payment header the client sent (same header name) with
//   a plain fetch, to check that the server refuses a replayed proof.
// Exit status: 0 iff the paid request ended with HTTP 200; 1 otherwise; 2 on usage errors.
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const ANVIL_1_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const BODY_LIMIT = 4000;

function usage(msg) {
  console.error(`pay.mjs: ${msg}\nusage: node pay.mjs --client v2|v1 --url URL [--key HEX] [--replay] [--timeout-ms N]`);
  process.exit(2);
}

const args = { client: "", url: "", key: ANVIL_1_KEY, replay: false, "timeout-ms": "30000" };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args) || !argv[i].startsWith("--")) usage(`unknown argument ${argv[i]}`);
  if (typeof args[k] === "boolean") args[k] = true;
  else if (i + 1 < argv.length) args[k] = argv[++i];
  else usage(`--${k} needs a value`);
}
if (!["v2", "v1"].includes(args.client)) usage("--client must be v2 or v1");
if (!args.url) usage("--url is required");
const timeoutMs = Number(args["timeout-ms"]);

const nodeDir = join(DEPS, "node");
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`pay.mjs: clients not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
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

/** The `error` of a 402: v2 PAYMENT-REQUIRED header first, then a v1 JSON body. */
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
  client: `js-${args.client}`,
  url: args.url,
  status: null,
  body: null,
  paymentResponse: null,
  paymentHeaderName: null,
  paymentHeader: null,
  replayStatus: null,
  replayBody: null,
  replayError: null,
  error: null,
};

// The clients call this instead of the global fetch, so we see exactly what goes on the wire,
// including the payment header of the paid retry (the last request that carried one wins).
async function recordingFetch(input, init) {
  const headers = new Request(input, init).headers;
  for (const name of ["PAYMENT-SIGNATURE", "X-PAYMENT"]) {
    const value = headers.get(name);
    if (value) {
      out.paymentHeaderName = name;
      out.paymentHeader = value;
    }
  }
  return fetch(input, init);
}

function payingFetch() {
  const { privateKeyToAccount } = need("viem/accounts");
  const account = privateKeyToAccount(args.key);
  if (args.client === "v2") {
    const { wrapFetchWithPayment, x402Client } = need("@x402/fetch");
    const { registerExactEvmScheme } = need("@x402/evm/exact/client");
    const client = new x402Client();
    registerExactEvmScheme(client, { signer: account });
    return wrapFetchWithPayment(recordingFetch, client);
  }
  const { wrapFetchWithPayment } = need("x402-fetch");
  const { createWalletClient, http, publicActions } = need("viem");
  const { baseSepolia } = need("viem/chains");
  // EIP-712 signing with a local account needs no RPC; the transport is only there because a
  // wallet client requires one (nothing listens on port 1, so any accidental call fails fast).
  const wallet = createWalletClient({ chain: baseSepolia, transport: http("http://127.0.0.1:1"), account }).extend(
    publicActions,
  );
  return wrapFetchWithPayment(recordingFetch, wallet);
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
  out.error = String(e?.stack || e?.message || e).split("\n").slice(0, 4).join(" | ");
}
process.stdout.write(JSON.stringify(out) + "\n");
process.exitCode = out.status === 200 ? 0 : 1;
