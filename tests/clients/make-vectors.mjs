#!/usr/bin/env node
// Provenance of tests/data/eip712-vectors.json: EIP-3009 TransferWithAuthorization golden vectors
// computed by viem (the library the official JS x402 clients sign with), checked by
// tests/vectors.rs against our Rust hashing and signature recovery.
//   node tests/clients/make-vectors.mjs      (after scripts/install-test-deps.sh)
// Deterministic: fixed keys, nonces and times, and RFC 6979 signatures, so a re-run rewrites the
// same bytes. The last case is the spec example from the x402 docs (its key is unknown: the
// signature is copied, and viem's hashes are checked against the published ones).
import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const need = createRequire(join(DEPS, "node", "package.json"));
const { hashDomain, hashStruct, hashTypedData, getAddress, keccak256, toHex, recoverTypedDataAddress, maxUint256 } =
  need("viem");
const { privateKeyToAccount } = need("viem/accounts");

const types = {
  EIP712Domain: [
    { name: "name", type: "string" },
    { name: "version", type: "string" },
    { name: "chainId", type: "uint256" },
    { name: "verifyingContract", type: "address" },
  ],
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
};

// Anvil's default mnemonic accounts #0..#5 (public test keys).
const KEYS = [
  "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
  "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
  "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
  "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
  "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
  "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
];
const acct = (i) => privateKeyToAccount(KEYS[i]);

const BASE = { name: "USD Coin", version: "2", chainId: 8453, verifyingContract: "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913" };
const BASE_SEPOLIA = { name: "USDC", version: "2", chainId: 84532, verifyingContract: "0x036CbD53842c5426634e7929541eC2318f3dCF7e" };
const ETHEREUM = { name: "USD Coin", version: "2", chainId: 1, verifyingContract: "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48" };
// Not a real token: non-ASCII name (strings are hashed as UTF-8) and a chain id above 2^32.
const ODD = { name: "Tést Dollar ₮", version: "10", chainId: 4294967297, verifyingContract: "0x00000000000000000000000000000000DeaDBeef" };

const T0 = 1767225600n; // 2026-01-01T00:00:00Z, a fixed "now"
const nonceOf = (label) => keccak256(toHex(`tower-x402 vector ${label}`));

// [description, domain, payer index, payTo, value, validAfter, validBefore, nonce]
const SPECS = [
  ["base mainnet USDC, $0.001", BASE, 1, acct(2).address, 1000n, T0 - 600n, T0 + 300n, nonceOf(1)],
  ["base sepolia USDC, quickstart price", BASE_SEPOLIA, 1, acct(2).address, 1000n, T0 - 600n, T0 + 300n, nonceOf(2)],
  ["value 0, validAfter 0", BASE_SEPOLIA, 0, acct(1).address, 0n, 0n, T0 + 60n, nonceOf(3)],
  ["value 2^256-1", BASE_SEPOLIA, 3, acct(2).address, maxUint256, T0 - 600n, T0 + 300n, nonceOf(4)],
  ["nonce all 0xff", BASE, 4, acct(2).address, 10000n, T0 - 600n, T0 + 300n, "0x" + "ff".repeat(32)],
  ["nonce all zero", BASE, 5, acct(0).address, 1n, T0, T0 + 1n, "0x" + "00".repeat(32)],
  ["validBefore year 9999", BASE_SEPOLIA, 5, acct(2).address, 2500n, T0 - 600n, 253402300799n, nonceOf(7)],
  ["validBefore 2^256-1", BASE, 3, acct(4).address, 123456789n, T0 - 600n, maxUint256, nonceOf(8)],
  ["ethereum mainnet USDC, payer = payTo", ETHEREUM, 2, acct(2).address, 1000000n, T0 - 600n, T0 + 300n, nonceOf(9)],
  ["non-ASCII token name, chain id > 2^32", ODD, 1, acct(3).address, 42n, T0 - 600n, T0 + 300n, nonceOf(10)],
];

function hashes(domain, message) {
  return {
    domainSeparator: hashDomain({ domain, types }),
    structHash: hashStruct({ data: message, primaryType: "TransferWithAuthorization", types }),
    digest: hashTypedData({ domain, types, primaryType: "TransferWithAuthorization", message }),
  };
}

// JSON form: integers as decimal strings, checksummed addresses, chainId as a number.
function vector(description, domain, message, signature, signer) {
  return {
    description,
    domain: { ...domain, verifyingContract: getAddress(domain.verifyingContract) },
    message: {
      from: getAddress(message.from),
      to: getAddress(message.to),
      value: message.value.toString(),
      validAfter: message.validAfter.toString(),
      validBefore: message.validBefore.toString(),
      nonce: message.nonce,
    },
    ...hashes(domain, message),
    signature,
    signer: getAddress(signer),
  };
}

const out = [];
for (const [description, domain, payer, to, value, validAfter, validBefore, nonce] of SPECS) {
  const account = acct(payer);
  const message = { from: account.address, to, value, validAfter, validBefore, nonce };
  const signature = await account.signTypedData({ domain, types, primaryType: "TransferWithAuthorization", message });
  out.push(vector(description, domain, message, signature, account.address));
}

// Spec example (x402 protocol digest §3.2): published signature, unknown key.
const spec = vector(
  "x402 spec example (published signature, key unknown)",
  BASE_SEPOLIA,
  {
    from: "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    value: 10000n,
    validAfter: 1740672089n,
    validBefore: 1740672154n,
    nonce: "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
  },
  "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c",
  "0x857b06519E91e3A54538791bDbb0E22373e36b66",
);
const published = {
  domainSeparator: "0x71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818",
  structHash: "0x49ad644555c7bdf3ea4fc022a4940ae5589b230b1dde0065c5504fa19bbe39a4",
  digest: "0xf256992871671abcb27ff92885a7afa46218724e5fc0bac35d050115aa1d22e6",
};
for (const [k, v] of Object.entries(published)) {
  if (spec[k] !== v) throw new Error(`spec vector: viem ${k} ${spec[k]} != published ${v}`);
}
if (out[0].domainSeparator !== "0x02fa7265e7c5d81118673727957699e4d68f74cd74b7db77da710fe8a2c7834f") {
  throw new Error("Base mainnet USDC domain separator differs from the published one");
}
out.push(spec);

// Every signature must recover to its signer through viem's own verifier path.
for (const v of out) {
  const message = { ...v.message, value: BigInt(v.message.value), validAfter: BigInt(v.message.validAfter), validBefore: BigInt(v.message.validBefore) };
  const got = await recoverTypedDataAddress({ domain: v.domain, types, primaryType: "TransferWithAuthorization", message, signature: v.signature });
  if (got !== v.signer) throw new Error(`${v.description}: recovered ${got}, expected ${v.signer}`);
  if (!/^0x[0-9a-f]{130}$/.test(v.signature)) throw new Error(`${v.description}: signature is not 65 bytes`);
}

const file = join(HERE, "..", "data", "eip712-vectors.json");
writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
console.error(`make-vectors: wrote ${out.length} cases to ${file}`);
