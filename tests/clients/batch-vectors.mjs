#!/usr/bin/env node
// Signs batch-settlement vectors with the OFFICIAL @x402/evm 2.27.0 batch-settlement client and a
// fixed key, and prints them as JSON (tests/data/batch-vectors.json is its committed output;
// tests/channel_vectors.rs decodes and verifies it with the crate's code):
//   {network, chainId, payerKey, payer, requirements, cases: [{description, channelConfig,
//    channelId, deposit: <payment payload>, voucher: <signed voucher>}]}
// What is signed: per case, buildChannelConfig -> computeChannelId,
// createBatchSettlementEIP3009DepositPayload (an EIP-3009 ReceiveWithAuthorization to the ERC-3009
// deposit collector plus the first voucher), and signVoucher for a later cumulative ceiling.
// The deposit's salt and validBefore are the client's own (random, now + maxTimeoutSeconds), so
// each run differs; any run's output is a valid vector set. Pure local signing, no RPC.
// Usage: node batch-vectors.mjs > tests/data/batch-vectors.json
// With --permit2 (tests/data/batch-permit2-vectors.json, read by tests/channel_permit2.rs): the
// requirement says assetTransferMethod "permit2" and each case's deposit is what
// BatchSettlementEvmScheme.createPaymentPayload signs for a new channel (a Permit2
// PermitWitnessTransferFrom to the Permit2 deposit collector, witness = the channel id, plus
// the first voucher); the signer has no readContract, so nothing is read on chain.
//   node batch-vectors.mjs --permit2 > tests/data/batch-permit2-vectors.json
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const require = createRequire(join(DEPS, "node", "node_modules", "x.js"));
const { privateKeyToAccount } = require("viem/accounts");
const bs = await import(require.resolve("@x402/evm/batch-settlement/client"));

// Anvil account #3, whose test USDC the chain tests mint.
const KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
const NETWORK = "eip155:84532";
const account = privateKeyToAccount(KEY);
const signer = { address: account.address, signTypedData: (m) => account.signTypedData(m) };

const requirements = {
  scheme: "batch-settlement",
  network: NETWORK,
  amount: "1000",
  asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
  payTo: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
  maxTimeoutSeconds: 3600,
  extra: {
    receiverAuthorizer: "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc",
    withdrawDelay: 900,
    name: "USDC",
    version: "2",
  },
};

const PERMIT2 = process.argv.includes("--permit2");
if (PERMIT2) requirements.extra.assetTransferMethod = "permit2";

const cases = [];
for (const [description, salt, withdrawDelay, depositAmount, later] of [
  ["default salt, 15 min delay", "0x" + "00".repeat(32), 900, "100000", "5000"],
  ["salt a1, 30 day delay", "0x" + "00".repeat(31) + "a1", 2592000, "1000000", "340282366920938463463374607431768211455"],
]) {
  const req = { ...requirements, extra: { ...requirements.extra, withdrawDelay } };
  const config = bs.buildChannelConfig({ signer, salt }, req);
  const channelId = bs.computeChannelId(config, NETWORK);
  const deposit = PERMIT2
    ? await new bs.BatchSettlementEvmScheme(signer, {
        salt,
        depositPolicy: { depositMultiplier: Number(depositAmount) / Number(req.amount) },
      }).createPaymentPayload(2, req)
    : await bs.createBatchSettlementEIP3009DepositPayload(
        signer, 2, req, config, depositAmount, req.amount,
      );
  const voucher = await bs.signVoucher(signer, channelId, later, NETWORK);
  cases.push({ description, requirements: req, channelConfig: config, channelId, deposit, voucher });
}
console.log(JSON.stringify({ network: NETWORK, chainId: 84532, payer: account.address, cases }, null, 2));
