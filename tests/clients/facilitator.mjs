#!/usr/bin/env node
// The reference x402 facilitator (@x402/core x402Facilitator + @x402/evm exact scheme, v2 and v1, and
// the v2 upto scheme) on loopback, settling on a local chain (tests/chain: anvil, chain id 84532, TestUSDC at the Base
// Sepolia USDC address) from anvil account #0, and the v2 batch-settlement scheme (deposits, claims,
// settles and refunds into the x402BatchSettlement escrow; no authorizer key of its own: the server
// signs claims and refunds). Used by tests/facilitator.rs and tests/channel_facilitator.rs.
//   node facilitator.mjs --rpc URL [--port 0] [--key HEX]
// First stdout line: `listening on http://127.0.0.1:PORT`. Then one stderr line per call.
// HTTP: GET /supported, POST /verify, POST /settle with {x402Version, paymentPayload,
// paymentRequirements} (what HTTPFacilitatorClient sends), answered as the reference does: 200 with
// the Verify/SettleResponse, 400 {error} for a body without both documents, 500 {error} on a throw.
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import http from "node:http";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const ANVIL_0_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const CHAIN_ID = 84532;
const MAX_BODY = 64 * 1024;

function usage(msg) {
  console.error(`facilitator.mjs: ${msg}\nusage: node facilitator.mjs --rpc URL [--port 0] [--key HEX]`);
  process.exit(2);
}

const args = { rpc: "", port: "0", key: ANVIL_0_KEY };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args) || !argv[i].startsWith("--")) usage(`unknown argument ${argv[i]}`);
  if (i + 1 >= argv.length) usage(`--${k} needs a value`);
  args[k] = argv[++i];
}
if (!args.rpc) usage("--rpc is required");

const nodeDir = join(DEPS, "node");
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`facilitator.mjs: packages not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
  process.exit(2);
}
// CommonJS builds through one require(): a single consistent module graph for all packages.
const need = createRequire(join(nodeDir, "package.json"));
const { createWalletClient, http: httpTransport, publicActions, defineChain } = need("viem");
const { privateKeyToAccount } = need("viem/accounts");
const { x402Facilitator } = need("@x402/core/facilitator");
const { registerExactEvmScheme } = need("@x402/evm/exact/facilitator");
const { UptoEvmScheme } = need("@x402/evm/upto/facilitator");
const { BatchSettlementEvmScheme } = need("@x402/evm/batch-settlement/facilitator");
const { toFacilitatorEvmSigner } = need("@x402/evm");

const chain = defineChain({
  id: CHAIN_ID,
  name: "anvil (Base Sepolia id)",
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [args.rpc] } },
});
const account = privateKeyToAccount(args.key);
const client = createWalletClient({ account, chain, transport: httpTransport(args.rpc) }).extend(publicActions);
// toFacilitatorEvmSigner spreads the client and needs a top-level `address`.
const signer = toFacilitatorEvmSigner({ ...client, address: account.address });

const facilitator = new x402Facilitator();
// v2 on eip155:84532, and (inside registerExactEvmScheme) v1 on the short names incl. base-sepolia.
registerExactEvmScheme(facilitator, { signer, networks: `eip155:${CHAIN_ID}` });
// v2 `upto` (Permit2 through the x402 upto proxy); /supported advertises the settling account
// as `extra.facilitatorAddress`.
facilitator.register(`eip155:${CHAIN_ID}`, new UptoEvmScheme(signer));
// v2 `batch-settlement` without an authorizer signer: /supported advertises no
// `receiverAuthorizer`, so servers supply the claim and refund signatures.
facilitator.register(`eip155:${CHAIN_ID}`, new BatchSettlementEvmScheme(signer));

const json = (obj) => JSON.stringify(obj, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
function send(res, status, obj) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(json(obj));
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

// Settlements are serialised so the facilitator account's nonces never race.
let queue = Promise.resolve();
const serial = (fn) => (queue = queue.then(fn, fn));

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, "http://x").pathname.replace(/\/+$/, "");
  try {
    if (req.method === "GET" && path === "/supported") return send(res, 200, facilitator.getSupported());
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
      return send(res, 200, result);
    }
    return send(res, 404, { error: "not found" });
  } catch (e) {
    console.error(path, "error:", e?.stack || e);
    return send(res, 500, { error: String(e?.message || e) });
  }
});

server.listen(Number(args.port), "127.0.0.1", () => {
  const { port } = server.address();
  process.stdout.write(`listening on http://127.0.0.1:${port}\n`);
  console.error(`x402 reference facilitator (signer ${account.address}, rpc ${args.rpc})`);
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => server.close(() => process.exit(0)));
