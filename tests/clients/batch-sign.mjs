#!/usr/bin/env node
// The OFFICIAL @x402/evm 2.27.0 batch-settlement client opens a channel and pays N calls, signing
// locally (no RPC): prints ONE JSON line {channelConfig, channelId, deposit, vouchers}, where
// `deposit` is the payment payload of createBatchSettlementEIP3009DepositPayload (an EIP-3009
// ReceiveWithAuthorization to the ERC-3009 deposit collector for DEPOSIT, plus the first voucher
// for `amount`) and `vouchers[k]` the voucher signVoucher makes for the cumulative ceiling
// CHARGED[k] (the server's charged total before call k+2, plus `amount`).
// Usage: node batch-sign.mjs KEY REQUIREMENTS_JSON DEPOSIT CHARGED_JSON_ARRAY [SALT]
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const require = createRequire(join(DEPS, "node", "node_modules", "x.js"));
const { privateKeyToAccount } = require("viem/accounts");
const bs = await import(require.resolve("@x402/evm/batch-settlement/client"));

const [key, reqJson, depositAmount, chargedJson, salt] = process.argv.slice(2);
if (!key || !reqJson || !depositAmount || !chargedJson) {
  console.error("usage: node batch-sign.mjs KEY REQUIREMENTS_JSON DEPOSIT CHARGED_JSON_ARRAY [SALT]");
  process.exit(2);
}
const req = JSON.parse(reqJson);
const account = privateKeyToAccount(key);
const signer = { address: account.address, signTypedData: (m) => account.signTypedData(m) };
const config = bs.buildChannelConfig({ signer, salt: salt ?? "0x" + "00".repeat(32) }, req);
const channelId = bs.computeChannelId(config, req.network);
const deposit = await bs.createBatchSettlementEIP3009DepositPayload(
  signer, 2, req, config, depositAmount, req.amount,
);
const vouchers = [];
for (const charged of JSON.parse(chargedJson)) {
  const ceiling = (BigInt(charged) + BigInt(req.amount)).toString();
  vouchers.push(await bs.signVoucher(signer, channelId, ceiling, req.network));
}
console.log(JSON.stringify({ channelConfig: config, channelId, deposit, vouchers }));
