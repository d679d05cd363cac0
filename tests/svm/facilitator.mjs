#!/usr/bin/env node
// The reference x402 facilitator for Solana (@x402/core x402Facilitator + @x402/svm 2.27's exact
// facilitator scheme) on loopback, co-signing as fee payer and settling through our local chain
// (tests/svm/chain.mjs). Used by tests/svm_facilitator.rs.
//   node facilitator.mjs --rpc URL --key HEX64 [--network solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1]
//   --key: the fee payer's 64-byte keypair (seed then public key), hex.
// First stdout line: `listening on http://127.0.0.1:PORT`. Then one stderr line per call.
// HTTP: GET /supported, POST /verify, POST /settle with {x402Version, paymentPayload,
// paymentRequirements}, answered as tests/clients/facilitator.mjs does (the reference's
// Verify/SettleResponse with 200, 400 {error} without both documents, 500 {error} on a throw).
// Test control: POST /x402/reply with a JSON {status, body}: the next /verify or /settle
// (field `endpoint`, default "/settle") is processed as usual but answered with that status
// and raw body instead (a hostile or broken facilitator after it acted).
// Packages come from $X402_TEST_DEPS/svm (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import http from "node:http";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const need = createRequire(join(DEPS, "svm", "package.json"));
const MAX_BODY = 64 * 1024;

function usage(msg) {
  console.error(`facilitator.mjs: ${msg}\nusage: node facilitator.mjs --rpc URL --key HEX64 [--network CAIP2]`);
  process.exit(2);
}

const args = { rpc: "", key: "", network: "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1" };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args) || !argv[i].startsWith("--")) usage(`unknown argument ${argv[i]}`);
  if (i + 1 >= argv.length) usage(`--${k} needs a value`);
  args[k] = argv[++i];
}
if (!args.rpc || !args.key) usage("--rpc and --key are required");

const { createKeyPairSignerFromBytes } = need("@solana/kit");
const { x402Facilitator } = need("@x402/core/facilitator");
const { registerExactSvmScheme } = need("@x402/svm/exact/facilitator");
const { toFacilitatorSvmSigner } = need("@x402/svm");

const keypair = await createKeyPairSignerFromBytes(Uint8Array.from(Buffer.from(args.key, "hex")));
// Every network's RPC is our chain (the official scheme knows only the public clusters' ids).
const signer = toFacilitatorSvmSigner(keypair, { defaultRpcUrl: args.rpc });
const facilitator = new x402Facilitator();
registerExactSvmScheme(facilitator, { signer, networks: args.network });

const json = (obj) => JSON.stringify(obj, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
function send(res, status, obj) {
  const text = typeof obj === "string" ? obj : json(obj);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

async function readJson(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > MAX_BODY) throw new Error("request body too large");
    chunks.push(c);
  }
  return JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
}

// Settlements are serialised, as a single fee payer's would be in the reference deployment.
let queue = Promise.resolve();
const serial = (fn) => (queue = queue.then(fn, fn));
const injected = {};

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, "http://x").pathname.replace(/\/+$/, "");
  try {
    if (req.method === "GET" && path === "/supported") return send(res, 200, facilitator.getSupported());
    if (req.method === "POST" && path === "/x402/reply") {
      const { endpoint = "/settle", status, body } = await readJson(req);
      injected[endpoint] = { status, body };
      return send(res, 200, { ok: true });
    }
    if (req.method === "POST" && (path === "/verify" || path === "/settle")) {
      const { paymentPayload, paymentRequirements } = await readJson(req);
      if (!paymentPayload || !paymentRequirements) {
        return send(res, 400, { error: "body must contain paymentPayload and paymentRequirements" });
      }
      const result =
        path === "/verify"
          ? await facilitator.verify(paymentPayload, paymentRequirements)
          : await serial(() => facilitator.settle(paymentPayload, paymentRequirements));
      console.error(path, `v${paymentPayload.x402Version}`, json(result));
      const fake = injected[path];
      if (fake) {
        delete injected[path];
        console.error(path, "answered with the injected reply", fake.status, fake.body);
        return send(res, fake.status, fake.body);
      }
      return send(res, 200, result);
    }
    return send(res, 404, { error: "not found" });
  } catch (e) {
    console.error(path, "error:", e?.stack || e);
    return send(res, 500, { error: String(e?.message || e) });
  }
});

server.listen(0, "127.0.0.1", () => {
  const { port } = server.address();
  process.stdout.write(`listening on http://127.0.0.1:${port}\n`);
  console.error(`x402 reference Solana facilitator (fee payer ${keypair.address}, rpc ${args.rpc})`);
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => server.close(() => process.exit(0)));
