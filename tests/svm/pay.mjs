#!/usr/bin/env node
// Pay an x402-protected URL with the official Solana client (@x402/fetch + @x402/svm's
// ExactSvmScheme, RPC = our local chain) and print ONE JSON line for tests/svm_chain.rs:
//   {status, body, retryAfter, paymentResponse, paymentHeader, replayStatus, error}
// Usage: node pay.mjs --url URL --rpc URL --key HEX64 [--replay]
//   --key: the payer's 64-byte keypair (seed then public key), hex.
// Packages come from $X402_TEST_DEPS/svm (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const need = createRequire(join(DEPS, "svm", "package.json"));

const args = { url: "", rpc: "", key: "", replay: false };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args)) {
    console.error(`pay.mjs: unknown argument ${argv[i]}`);
    process.exit(2);
  }
  if (typeof args[k] === "boolean") args[k] = true;
  else args[k] = argv[++i];
}

const out = {
  status: null,
  body: null,
  retryAfter: null,
  paymentResponse: null,
  paymentHeader: null,
  replayStatus: null,
  error: null,
};
const decode = (v) => (v ? JSON.parse(Buffer.from(v, "base64").toString("utf8")) : null);

async function recordingFetch(input, init) {
  const value = new Request(input, init).headers.get("PAYMENT-SIGNATURE");
  if (value) out.paymentHeader = value;
  return fetch(input, init);
}

async function run() {
  const { createKeyPairSignerFromBytes } = need("@solana/kit");
  const { wrapFetchWithPayment, x402Client } = need("@x402/fetch");
  const { ExactSvmScheme } = need("@x402/svm/exact/client");
  const signer = await createKeyPairSignerFromBytes(Uint8Array.from(Buffer.from(args.key, "hex")));
  const client = new x402Client();
  client.register("solana:*", new ExactSvmScheme(signer, { rpcUrl: args.rpc }));
  const res = await wrapFetchWithPayment(recordingFetch, client)(args.url, { signal: AbortSignal.timeout(30000) });
  out.status = res.status;
  out.body = await res.text();
  out.retryAfter = res.headers.get("retry-after");
  out.paymentResponse = decode(res.headers.get("payment-response"));
  if (res.status === 402) out.error = decode(res.headers.get("payment-required"))?.error ?? null;
  if (args.replay && out.paymentHeader) {
    const again = await fetch(args.url, { headers: { "PAYMENT-SIGNATURE": out.paymentHeader } });
    out.replayStatus = again.status;
    await again.text();
  }
}

run()
  .catch((e) => {
    out.error = String(e && e.stack ? e.stack : e);
  })
  .finally(() => {
    console.log(JSON.stringify(out));
    process.exit(out.status === 200 ? 0 : 1);
  });
