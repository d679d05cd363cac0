#!/usr/bin/env node
// Call a prepaid (sign-in-with-x) URL N times with the official, unmodified JS client and print
// ONE JSON line (read by tests/prepaid.rs):
//   {calls: [{status, receipt}], wire: [{siwx, payment, status}], error}
// Usage: node siwx.mjs --url URL [--calls N] [--key HEX]
//   @x402/fetch wrapFetchWithPayment + @x402/evm registerExactEvmScheme + the SIWX client
//   extension of @x402/extensions (createSIWxClientExtension): on a 402 that declares
//   sign-in-with-x the client first retries signed in, and pays only if that is a 402 too.
// Exit status: 0 iff every call ended with HTTP 200; 1 otherwise; 2 on usage errors.
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
// @x402/extensions 2.27.0 is there as a dependency of @x402/express (pinned in package-lock.json).
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const ANVIL_1_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

function usage(msg) {
  console.error(`siwx.mjs: ${msg}\nusage: node siwx.mjs --url URL [--calls N] [--key HEX]`);
  process.exit(2);
}

const args = { url: "", calls: "1", key: ANVIL_1_KEY };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args) || !argv[i].startsWith("--")) usage(`unknown argument ${argv[i]}`);
  if (i + 1 < argv.length) args[k] = argv[++i];
  else usage(`--${k} needs a value`);
}
if (!args.url) usage("--url is required");
const calls = Number(args.calls);

const nodeDir = join(DEPS, "node");
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`siwx.mjs: clients not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
  process.exit(2);
}
const need = createRequire(join(nodeDir, "package.json"));

const out = { calls: [], wire: [], error: null };

// Every request on the wire: which credential it carried and what came back.
async function recordingFetch(input, init) {
  const headers = new Request(input, init).headers;
  const res = await fetch(input, init);
  out.wire.push({
    siwx: headers.has("SIGN-IN-WITH-X"),
    payment: headers.has("PAYMENT-SIGNATURE"),
    status: res.status,
  });
  return res;
}

async function run() {
  const { privateKeyToAccount } = need("viem/accounts");
  const { wrapFetchWithPayment, x402Client } = need("@x402/fetch");
  const { registerExactEvmScheme } = need("@x402/evm/exact/client");
  const { createSIWxClientExtension } = need("@x402/extensions/sign-in-with-x");
  const account = privateKeyToAccount(args.key);
  const client = new x402Client();
  registerExactEvmScheme(client, { signer: account });
  client.registerExtension(createSIWxClientExtension({ signers: [account] }));
  const paying = wrapFetchWithPayment(recordingFetch, client);
  for (let i = 0; i < calls; i++) {
    const res = await paying(args.url, { method: "GET", signal: AbortSignal.timeout(30000) });
    await res.text();
    out.calls.push({ status: res.status, receipt: res.headers.has("payment-response") });
  }
}

try {
  await run();
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e);
}
console.log(JSON.stringify(out));
process.exit(out.error === null && out.calls.every((c) => c.status === 200) ? 0 : 1);
