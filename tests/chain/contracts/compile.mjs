// Compiles the contracts in tests/chain/contracts (all ours, see SOURCES.md) with solc-js and
// writes their RUNTIME bytecode (hex, no 0x, one line) to <outdir>/<Name>.runtime.hex (for
// TestWallet.sol: TestWalletFactory, whose runtime embeds TestWallet's creation code). The tests
// etch that bytecode with anvil_setCode, so only the runtime part matters: no constructor runs,
// and none of these contracts has constructor state or immutables.
// Usage: node compile.mjs <node_modules dir holding solc> <outdir>
//   (run by compile.sh)
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const [modules, outDir] = process.argv.slice(2);
if (!modules || !outDir) {
  console.error("usage: node compile.mjs <node_modules dir holding solc> <outdir>");
  process.exit(2);
}
const solc = createRequire(join(resolve(modules), "x.js"))("solc");

// [source file, contract whose runtime code is written, optional settings over `base`]
const contracts = [
  ["TestUSDC.sol", "TestUSDC"],
  ["MiniMulticall3.sol", "MiniMulticall3"],
  ["TestWallet.sol", "TestWalletFactory"],
  // Built as the canonical Permit2 is (via IR, 1,000,000 runs), so its gas is close to mainnet's.
  ["Permit2.sol", "Permit2", { viaIR: true, optimizer: { enabled: true, runs: 1_000_000 } }],
  ["UptoPermit2Proxy.sol", "UptoPermit2Proxy"],
  // The batch-settlement escrow and its ERC-3009 deposit collector. Cancun: the escrow's
  // reentrancy guard uses transient storage (EIP-1153), as the spec requires of the canonical one.
  ["BatchSettlement.sol", "BatchSettlement", { evmVersion: "cancun" }],
  ["ERC3009DepositCollector.sol", "ERC3009DepositCollector", { evmVersion: "cancun" }],
  ["Permit2DepositCollector.sol", "Permit2DepositCollector", { evmVersion: "cancun" }],
];
const base = {
  optimizer: { enabled: true, runs: 200 },
  // Shanghai (PUSH0) runs on anvil's default hardfork and on Base.
  evmVersion: "shanghai",
  // No metadata hash or CBOR trailer: the bytecode depends on the source text only through
  // the code itself, so comment edits do not churn the committed hex.
  metadata: { bytecodeHash: "none", appendCBOR: false },
  outputSelection: { "*": { "*": ["evm.deployedBytecode.object"] } },
};

function compile(input) {
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  for (const e of out.errors ?? []) console.error(e.formattedMessage);
  if ((out.errors ?? []).some((e) => e.severity === "error")) process.exit(1);
  return out;
}

// One solc run per distinct settings, with the sources that use them.
const runs = new Map();
for (const [file, , extra = {}] of contracts) {
  const key = JSON.stringify(extra);
  if (!runs.has(key)) runs.set(key, { settings: { ...base, ...extra }, sources: {} });
  runs.get(key).sources[file] = { content: readFileSync(join(here, file), "utf8") };
}
const built = {};
for (const { settings, sources } of runs.values()) {
  Object.assign(built, compile({ language: "Solidity", sources, settings }).contracts);
}

mkdirSync(outDir, { recursive: true });
for (const [file, name] of contracts) {
  const hex = built[file][name].evm.deployedBytecode.object;
  writeFileSync(join(outDir, `${name}.runtime.hex`), hex + "\n");
  console.log(`${name}: ${hex.length / 2} bytes of runtime code (solc ${solc.version()})`);
}
