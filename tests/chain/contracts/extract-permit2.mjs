// Extracts the canonical Permit2 RUNTIME bytecode from Uniswap/permit2's
// test/utils/DeployPermit2.sol (the `hex"..."` literal that forge tests `vm.etch` at
// 0x000000000022D473030F116dDEE9F6B43aC78BA3) and writes it, verbatim, to
// <outdir>/Permit2.runtime.hex (hex, no 0x, one line).
// Usage: node extract-permit2.mjs <DeployPermit2.sol> <outdir> <node_modules dir holding viem>
//   (run by compile.sh, which fetches the file at the pinned commit; see SOURCES.md).
// Checks, so a wrong file or a truncated copy fails loudly:
//   - exactly one hex literal in the file;
//   - it is Permit2's runtime code as a forge test deployed it: its two immutables hold chain id
//     31337 and the EIP-712 domain separator of "Permit2" for chain 31337 at the forge test
//     address 0xF62849F9A0B5Bf2913b396098F7c7019b51A820a. Permit2 only compares block.chainid
//     with the cached id and otherwise recomputes the separator with address(this), so etched
//     at the canonical address on chain 84532 it signs for (84532, canonical address). (Never
//     etch it on chain 31337: it would use the cached separator of the other address. And it is
//     not byte-identical to mainnet's code, whose immutables hold chain 1.)
//   - its keccak256 is the one pinned below (the hash of the literal at the pinned commit).
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

// keccak256 of the runtime code in DeployPermit2.sol at Uniswap/permit2@cc56ad0f3439c502c246fc5cfcc3db92bb8b7219.
const EXPECTED_CODE_HASH = "0xa1ad0529565c25202190d4ae7f75d4ca08dc432cc760544ee7d0313b68e82ecd";

const [file, outDir, modules] = process.argv.slice(2);
if (!file || !outDir || !modules) {
  console.error("usage: node extract-permit2.mjs <DeployPermit2.sol> <outdir> <node_modules dir holding viem>");
  process.exit(2);
}
const { keccak256, encodeAbiParameters, toHex } = createRequire(join(resolve(modules), "x.js"))("viem");

const fail = (msg) => {
  console.error(`extract-permit2: ${msg}`);
  process.exit(1);
};
const text = readFileSync(file, "utf8");
const literals = [...text.matchAll(/hex"([0-9a-fA-F]*)"/g)];
if (literals.length !== 1) fail(`expected one hex"..." literal in ${file}, found ${literals.length}`);
const hex = literals[0][1].toLowerCase();
if (hex.length === 0 || hex.length % 2 !== 0) fail("the hex literal is empty or has an odd length");

const CACHED_CHAIN_ID = 31337n;
const CACHED_ADDRESS = "0xF62849F9A0B5Bf2913b396098F7c7019b51A820a";
const separator = keccak256(
  encodeAbiParameters(
    [{ type: "bytes32" }, { type: "bytes32" }, { type: "uint256" }, { type: "address" }],
    [
      keccak256(toHex("EIP712Domain(string name,uint256 chainId,address verifyingContract)")),
      keccak256(toHex("Permit2")),
      CACHED_CHAIN_ID,
      CACHED_ADDRESS,
    ],
  ),
);
const pushChainId = "7f" + CACHED_CHAIN_ID.toString(16).padStart(64, "0");
if (!hex.includes(pushChainId)) fail(`the code does not cache chain id ${CACHED_CHAIN_ID}`);
if (!hex.includes("7f" + separator.slice(2))) fail(`the code does not cache the Permit2 domain separator ${separator} of chain ${CACHED_CHAIN_ID} at ${CACHED_ADDRESS}`);
const hash = keccak256(`0x${hex}`);
if (hash !== EXPECTED_CODE_HASH) fail(`keccak256 of the code is ${hash}, expected ${EXPECTED_CODE_HASH}`);

mkdirSync(outDir, { recursive: true });
writeFileSync(join(outDir, "Permit2.runtime.hex"), hex + "\n");
console.log(`Permit2: ${hex.length / 2} bytes of runtime code, keccak256 ${hash}, cached chain ${CACHED_CHAIN_ID}, separator ${separator}`);
