#!/usr/bin/env node
// The reference x402 sellers for tests/client_chain.rs, in one process on loopback:
//   * a facilitator built from @x402/core's x402Facilitator + @x402/evm's exact EVM scheme,
//     settling on the given RPC with anvil account #0 (v2 eip155:84532 and v1 base-sepolia);
//   * @x402/express 2.27.0 (v2) and x402-express 1.2.0 (v1) servers, each selling
//     GET /weather for --price to --pay-to through that facilitator (GET /health is free).
//   * an @x402/express 2.27.0 server selling GET /channel for $0.001 with the reference
//     batch-settlement SERVER scheme (@x402/evm/batch-settlement/server; receiver authorizer
//     anvil #5, withdraw delay 900 s), the facilitator also registering the reference
//     batch-settlement FACILITATOR scheme (the escrow at its canonical addresses, as
//     tests/chain/mod.rs deploys it); POST /claim-and-settle on it runs the reference
//     BatchSettlementChannelManager's claimAndSettle() and answers its result as JSON.
// Prints ONE JSON line once all four listen: {"facilitator": URL, "v2": URL, "v1": URL,
// "channel": URL}, then serves until killed. Logs go to stderr.
//   node reference-server.mjs --rpc URL [--pay-to ADDR] [--price '$0.01']
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import http from "node:http";
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const RELAYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"; // anvil #0
const CHAIN_ID = 84532;
const NETWORK_V2 = "eip155:84532";
const NETWORK_V1 = "base-sepolia";

const args = { rpc: "", "pay-to": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", price: "$0.01" };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const k = argv[i].replace(/^--/, "");
  if (!(k in args) || !argv[i].startsWith("--") || i + 1 >= argv.length) {
    console.error(`reference-server.mjs: bad argument ${argv[i]}\nusage: --rpc URL [--pay-to ADDR] [--price '$0.01']`);
    process.exit(2);
  }
  args[k] = argv[i + 1];
}
if (!args.rpc) {
  console.error("reference-server.mjs: --rpc is required");
  process.exit(2);
}
const nodeDir = join(DEPS, "node");
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`reference-server.mjs: packages not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
  process.exit(2);
}
// CommonJS builds through one require(): a single consistent module graph for all packages.
const need = createRequire(join(nodeDir, "package.json"));

const log = (...a) => console.error(new Date().toISOString(), ...a);
const json = (obj) => JSON.stringify(obj, (_k, v) => (typeof v === "bigint" ? v.toString() : v));

// ---- facilitator ------------------------------------------------------------------------------
const { createWalletClient, http: httpTransport, publicActions, defineChain } = need("viem");
const { privateKeyToAccount } = need("viem/accounts");
const { x402Facilitator } = need("@x402/core/facilitator");
const { registerExactEvmScheme } = need("@x402/evm/exact/facilitator");
const { toFacilitatorEvmSigner } = need("@x402/evm");

const chain = defineChain({
  id: CHAIN_ID,
  name: "anvil (Base Sepolia id)",
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [args.rpc] } },
});
const account = privateKeyToAccount(RELAYER_KEY);
const wallet = createWalletClient({ account, chain, transport: httpTransport(args.rpc) }).extend(publicActions);
// toFacilitatorEvmSigner spreads the client and needs a top-level `address`.
const facilitator = new x402Facilitator();
registerExactEvmScheme(facilitator, {
  signer: toFacilitatorEvmSigner({ ...wallet, address: account.address }),
  networks: NETWORK_V2,
});
// The batch-settlement facilitator scheme (deposits, claims, settles, refunds) with the same
// relayer; the server signs claims and refunds itself (its receiverAuthorizerSigner).
{
  const { BatchSettlementEvmScheme } = need("@x402/evm/batch-settlement/facilitator");
  facilitator.register(
    NETWORK_V2,
    new BatchSettlementEvmScheme(toFacilitatorEvmSigner({ ...wallet, address: account.address })),
  );
}

// Settlements one at a time, so the relayer's account nonces never race.
let queue = Promise.resolve();
const serial = (fn) => (queue = queue.then(fn, fn));

function send(res, status, obj) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(json(obj));
}

const facilitatorServer = http.createServer(async (req, res) => {
  const path = new URL(req.url, "http://x").pathname.replace(/\/+$/, "");
  try {
    if (req.method === "GET" && path === "/supported") return send(res, 200, facilitator.getSupported());
    if (req.method === "POST" && (path === "/verify" || path === "/settle")) {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      const { paymentPayload, paymentRequirements } = JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
      if (!paymentPayload || !paymentRequirements) return send(res, 400, { error: "paymentPayload and paymentRequirements required" });
      const result =
        path === "/verify"
          ? await facilitator.verify(paymentPayload, paymentRequirements)
          : await serial(() => facilitator.settle(paymentPayload, paymentRequirements));
      log("facilitator", path, `v${paymentPayload.x402Version}`, json(result));
      return send(res, 200, result);
    }
    return send(res, 404, { error: "not found" });
  } catch (e) {
    log("facilitator", path, "error:", e?.stack || e);
    return send(res, 500, { error: String(e?.message || e) });
  }
});

// ---- the two sellers --------------------------------------------------------------------------
const express = need("express");
const description = "Weather report (reference seller)";
const weather = (_req, res) => res.json({ report: { weather: "sunny", temperature: 70 } });

function v2App(facilitatorUrl) {
  const { paymentMiddleware, x402ResourceServer } = need("@x402/express");
  const { ExactEvmScheme } = need("@x402/evm/exact/server");
  const { HTTPFacilitatorClient } = need("@x402/core/server");
  const server = new x402ResourceServer(new HTTPFacilitatorClient({ url: facilitatorUrl })).register(
    NETWORK_V2,
    new ExactEvmScheme(),
  );
  const app = express();
  app.use(
    paymentMiddleware(
      {
        "GET /weather": {
          accepts: { scheme: "exact", price: args.price, network: NETWORK_V2, payTo: args["pay-to"] },
          description,
          mimeType: "application/json",
        },
      },
      server,
    ),
  );
  app.get("/health", (_req, res) => res.json({ ok: true }));
  app.get("/weather", weather);
  return app;
}

function v1App(facilitatorUrl) {
  const { paymentMiddleware } = need("x402-express");
  const app = express();
  app.use(
    paymentMiddleware(
      args["pay-to"],
      { "GET /weather": { price: args.price, network: NETWORK_V1, config: { description, mimeType: "application/json" } } },
      { url: facilitatorUrl },
    ),
  );
  app.get("/health", (_req, res) => res.json({ ok: true }));
  app.get("/weather", weather);
  return app;
}

// The batch-settlement seller: its own resource server and channel manager.
const AUTHORIZER_KEY = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba"; // anvil #5
const TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
function channelApp(facilitatorUrl) {
  const { paymentMiddleware, x402ResourceServer } = need("@x402/express");
  const bs = need("@x402/evm/batch-settlement/server");
  const { HTTPFacilitatorClient } = need("@x402/core/server");
  const facilitatorClient = new HTTPFacilitatorClient({ url: facilitatorUrl });
  const scheme = new bs.BatchSettlementEvmScheme(args["pay-to"], {
    receiverAuthorizerSigner: privateKeyToAccount(AUTHORIZER_KEY),
    withdrawDelay: 900,
  });
  const server = new x402ResourceServer(facilitatorClient).register(NETWORK_V2, scheme);
  const manager = new bs.BatchSettlementChannelManager({
    scheme,
    facilitator: facilitatorClient,
    receiver: args["pay-to"],
    token: TOKEN,
    network: NETWORK_V2,
  });
  const app = express();
  app.post("/claim-and-settle", async (_req, res) => {
    try {
      const result = await manager.claimAndSettle();
      log("channel claim-and-settle", json(result));
      res.type("application/json").send(json(result));
    } catch (e) {
      log("channel claim-and-settle error:", e?.stack || e);
      res.status(500).json({ error: String(e?.message || e) });
    }
  });
  app.use(
    paymentMiddleware(
      {
        "GET /channel": {
          accepts: { scheme: "batch-settlement", price: "$0.001", network: NETWORK_V2, payTo: args["pay-to"] },
          description: "A metered call paid from a channel (reference seller)",
          mimeType: "application/json",
        },
      },
      server,
    ),
  );
  app.get("/channel", weather);
  return app;
}

const listen = (server) =>
  new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => ok(`http://127.0.0.1:${server.address().port}`));
  });

const facilitatorUrl = await listen(facilitatorServer);
const v2 = await listen(http.createServer(v2App(facilitatorUrl)));
const v1 = await listen(http.createServer(v1App(facilitatorUrl)));
const channel = await listen(http.createServer(channelApp(facilitatorUrl)));
log(`facilitator ${facilitatorUrl} (relayer ${account.address}, rpc ${args.rpc}); v2 ${v2}; v1 ${v1}; channel ${channel}`);
process.stdout.write(json({ facilitator: facilitatorUrl, v2, v1, channel }) + "\n");
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
