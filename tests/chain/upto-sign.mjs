#!/usr/bin/env node
// Cross-check for tests/upto_chain.rs: what the OFFICIAL @x402/evm upto client signs, computed
// by the installed packages themselves (no network). Prints ONE JSON line:
//   {payload, digest, viemSignature}
//   payload        UptoEvmScheme(account).createPaymentPayload(2, requirements) as the client
//                  sends it ({x402Version, payload: {signature, permit2Authorization}})
//   digest         viem hashTypedData of that permit2Authorization (domain {name: "Permit2",
//                  chainId, verifyingContract: PERMIT2_ADDRESS}, @x402/evm's uptoPermit2WitnessTypes)
//   viemSignature  viem signTypedData of the same message with the same key
// Usage: node upto-sign.mjs <private key hex> '<PaymentRequirements JSON>'
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh).
import { createRequire } from "node:module";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const need = createRequire(join(DEPS, "node", "package.json"));

const [key, requirementsJson] = process.argv.slice(2);
if (!key || !requirementsJson) {
  console.error("usage: node upto-sign.mjs <private key hex> '<PaymentRequirements JSON>'");
  process.exit(2);
}
const requirements = JSON.parse(requirementsJson);
const { privateKeyToAccount } = need("viem/accounts");
const { hashTypedData } = need("viem");
const { UptoEvmScheme } = need("@x402/evm/upto/client");
const { PERMIT2_ADDRESS, uptoPermit2WitnessTypes } = need("@x402/evm");

const account = privateKeyToAccount(key);
const payload = await new UptoEvmScheme(account).createPaymentPayload(2, requirements);
const auth = payload.payload.permit2Authorization;
const typedData = {
  domain: { name: "Permit2", chainId: Number(requirements.network.split(":")[1]), verifyingContract: PERMIT2_ADDRESS },
  types: uptoPermit2WitnessTypes,
  primaryType: "PermitWitnessTransferFrom",
  message: {
    permitted: { token: auth.permitted.token, amount: BigInt(auth.permitted.amount) },
    spender: auth.spender,
    nonce: BigInt(auth.nonce),
    deadline: BigInt(auth.deadline),
    witness: { to: auth.witness.to, facilitator: auth.witness.facilitator, validAfter: BigInt(auth.witness.validAfter) },
  },
};
const digest = hashTypedData(typedData);
const viemSignature = await account.signTypedData(typedData);
process.stdout.write(JSON.stringify({ payload, digest, viemSignature }) + "\n");
