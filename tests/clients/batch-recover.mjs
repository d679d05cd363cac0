#!/usr/bin/env node
// A client that LOST its channel state meets a corrective 402: the OFFICIAL @x402/evm 2.27.0
// batch-settlement client's processCorrectivePaymentRequired reads our 402 body (accepts[].extra
// .channelState / .voucherState), checks the voucher signature against its own key and the
// channel on chain (RPC), adopts the server's charged amount, and signs the next voucher
// (charged + amount). Prints ONE JSON line {recovered, context, channelConfig, voucher}.
// Usage: node batch-recover.mjs KEY RPC_URL PAYMENT_REQUIRED_JSON [SALT]
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const require = createRequire(join(DEPS, "node", "node_modules", "x.js"));
const { createPublicClient, http } = require("viem");
const { privateKeyToAccount } = require("viem/accounts");
const bs = await import(require.resolve("@x402/evm/batch-settlement/client"));

const [key, rpcUrl, requiredJson, salt] = process.argv.slice(2);
if (!key || !rpcUrl || !requiredJson) {
  console.error("usage: node batch-recover.mjs KEY RPC_URL PAYMENT_REQUIRED_JSON [SALT]");
  process.exit(2);
}
const required = JSON.parse(requiredJson);
const account = privateKeyToAccount(key);
const client = createPublicClient({ transport: http(rpcUrl) });
const signer = {
  address: account.address,
  signTypedData: (m) => account.signTypedData(m),
  readContract: (args) => client.readContract(args),
};
const storage = new bs.InMemoryClientChannelStorage();
const deps = { signer, storage, salt: salt ?? "0x" + "00".repeat(32) };
const recovered = await bs.processCorrectivePaymentRequired(deps, required);
const accept = required.accepts.find((a) => a.scheme === "batch-settlement");
const channelConfig = bs.buildChannelConfig(deps, accept);
const channelId = bs.computeChannelId(channelConfig, accept.network);
const context = await storage.get(channelId);
let voucher = null;
if (recovered && context) {
  const ceiling = (BigInt(context.chargedCumulativeAmount) + BigInt(accept.amount)).toString();
  voucher = await bs.signVoucher(signer, channelId, ceiling, accept.network);
}
console.log(JSON.stringify({ recovered, context: context ?? null, channelConfig, voucher }));
