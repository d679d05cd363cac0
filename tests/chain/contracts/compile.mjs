// Compiles tests/chain/contracts/{TestUSDC,MiniMulticall3,TestWallet}.sol and the vendored
// vendor/x402/x402UptoPermit2Proxy.sol with solc-js and writes their RUNTIME bytecode (hex, no 0x,
// one line) to <outdir>/<Name>.runtime.hex (for TestWallet.sol: TestWalletFactory, whose runtime
// embeds TestWallet's creation code). The tests etch that bytecode with anvil_setCode, so only the
// runtime part matters (no constructor runs): the proxy's one immutable (PERMIT2) is patched into
// its runtime code here, where its constructor would have written it.
// Usage: node compile.mjs <node_modules dir holding solc> <outdir> <node_modules dir holding viem>
//   (run by compile.sh)
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const [modules, outDir, viemModules] = process.argv.slice(2);
if (!modules || !outDir || !viemModules) {
  console.error("usage: node compile.mjs <node_modules dir holding solc> <outdir> <node_modules dir holding viem>");
  process.exit(2);
}
const solc = createRequire(join(resolve(modules), "x.js"))("solc");
const { keccak256, getContractAddress } = createRequire(join(resolve(viemModules), "x.js"))("viem");

// [source file, contract whose runtime code is written]
const contracts = [
  ["TestUSDC.sol", "TestUSDC"],
  ["MiniMulticall3.sol", "MiniMulticall3"],
  ["TestWallet.sol", "TestWalletFactory"],
];
const sources = {};
for (const file of new Set(contracts.map(([file]) => file))) {
  sources[file] = { content: readFileSync(join(here, file), "utf8") };
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    // Shanghai (PUSH0) runs on anvil's default hardfork and on Base.
    evmVersion: "shanghai",
    // No metadata hash or CBOR trailer: the bytecode depends on the source text only through
    // the code itself, so comment edits do not churn the committed hex.
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { "*": ["evm.deployedBytecode.object"] } },
  },
};
const out = compile(input);

function compile(input) {
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  for (const e of out.errors ?? []) console.error(e.formattedMessage);
  if ((out.errors ?? []).some((e) => e.severity === "error")) process.exit(1);
  return out;
}

mkdirSync(outDir, { recursive: true });
for (const [file, name] of contracts) {
  const hex = out.contracts[file][name].evm.deployedBytecode.object;
  writeFileSync(join(outDir, `${name}.runtime.hex`), hex + "\n");
  console.log(`${name}: ${hex.length / 2} bytes of runtime code (solc ${solc.version()})`);
}

// x402UptoPermit2Proxy, from the vendored coinbase/x402 source (see SOURCES.md), built exactly as
// coinbase/x402's contracts/evm/foundry.toml builds it: solc 0.8.28, optimizer 200 runs, no CBOR
// metadata, solc's default EVM version for 0.8.28 (cancun), the same source unit names and
// remapping. Its creation code plus abi.encode(PERMIT2) must then hash to the init code hash that
// coinbase/x402 pins for the CREATE2 deployment at the canonical proxy address; checked below, so
// the committed runtime code is the canonical proxy's, byte for byte.
const PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3";
const UPTO_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002";
// contracts/evm/vanity-miner/src/main.rs (UPTO_INIT_CODE_HASH) and script/Deploy.s.sol (UPTO_SALT).
const UPTO_INIT_CODE_HASH = "0x74f7a29cbc3c55f87cdef7f7c551643189e8bb62eed9de67753aebc402b83797";
const UPTO_SALT = "0x000000000000000000000000000000000000000000000000b000000001db633d";
const CREATE2_DEPLOYER = "0x4e59b44847b379578588920cA78FbF26c0B4956C";
const vendored = {
  "src/x402UptoPermit2Proxy.sol": "vendor/x402/x402UptoPermit2Proxy.sol",
  "src/x402BasePermit2Proxy.sol": "vendor/x402/x402BasePermit2Proxy.sol",
  "src/interfaces/ISignatureTransfer.sol": "vendor/x402/interfaces/ISignatureTransfer.sol",
  "lib/openzeppelin-contracts/contracts/utils/ReentrancyGuard.sol":
    "vendor/openzeppelin/contracts/utils/ReentrancyGuard.sol",
  "lib/openzeppelin-contracts/contracts/utils/StorageSlot.sol": "vendor/openzeppelin/contracts/utils/StorageSlot.sol",
  "lib/openzeppelin-contracts/contracts/token/ERC20/extensions/IERC20Permit.sol":
    "vendor/openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol",
};
const proxyOut = compile({
  language: "Solidity",
  sources: Object.fromEntries(
    Object.entries(vendored).map(([unit, file]) => [unit, { content: readFileSync(join(here, file), "utf8") }]),
  ),
  settings: {
    remappings: ["@openzeppelin/contracts/=lib/openzeppelin-contracts/contracts/"],
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: {
      "src/x402UptoPermit2Proxy.sol": {
        x402UptoPermit2Proxy: [
          "evm.bytecode.object",
          "evm.deployedBytecode.object",
          "evm.deployedBytecode.immutableReferences",
        ],
      },
    },
  },
});
const proxy = proxyOut.contracts["src/x402UptoPermit2Proxy.sol"].x402UptoPermit2Proxy;
const permit2Word = PERMIT2.slice(2).toLowerCase().padStart(64, "0");
const initCodeHash = keccak256(`0x${proxy.evm.bytecode.object}${permit2Word}`);
const create2 = getContractAddress({
  opcode: "CREATE2",
  from: CREATE2_DEPLOYER,
  salt: UPTO_SALT,
  bytecodeHash: initCodeHash,
});
if (initCodeHash !== UPTO_INIT_CODE_HASH || create2 !== UPTO_PROXY) {
  console.error(
    `x402UptoPermit2Proxy: init code hash ${initCodeHash} (CREATE2 address ${create2}), ` +
      `expected ${UPTO_INIT_CODE_HASH} (${UPTO_PROXY})`,
  );
  process.exit(1);
}
// The constructor writes PERMIT2 into every immutable slot; ISignatureTransfer PERMIT2 is the only one.
const refs = Object.values(proxy.evm.deployedBytecode.immutableReferences ?? {});
if (refs.length !== 1 || refs[0].length === 0) {
  console.error(`x402UptoPermit2Proxy: expected one immutable (PERMIT2), got ${JSON.stringify(refs)}`);
  process.exit(1);
}
let runtime = proxy.evm.deployedBytecode.object;
for (const { start, length } of refs[0]) {
  if (length !== 32 || !/^0+$/.test(runtime.slice(start * 2, (start + length) * 2))) {
    console.error(`x402UptoPermit2Proxy: unexpected immutable slot at ${start} (${length} bytes)`);
    process.exit(1);
  }
  runtime = runtime.slice(0, start * 2) + permit2Word + runtime.slice((start + length) * 2);
}
writeFileSync(join(outDir, "x402UptoPermit2Proxy.runtime.hex"), runtime + "\n");
console.log(
  `x402UptoPermit2Proxy: ${runtime.length / 2} bytes of runtime code, PERMIT2 patched at ${refs[0].length} places; ` +
    `init code hash ${initCodeHash} = coinbase/x402's, CREATE2 address ${create2}`,
);
