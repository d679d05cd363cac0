// Compiles tests/chain/contracts/TestUSDC.sol with solc-js and writes its RUNTIME bytecode (hex, no 0x,
// one line) to <outdir>/TestUSDC.runtime.hex. The tests etch that bytecode with anvil_setCode,
// so only the runtime part matters (no constructor runs).
// Usage: node compile.mjs <node_modules dir holding solc> <outdir>   (run by compile.sh)
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

const input = {
  language: "Solidity",
  sources: { "TestUSDC.sol": { content: readFileSync(join(here, "TestUSDC.sol"), "utf8") } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    // Shanghai (PUSH0) runs on anvil's default hardfork and on Base.
    evmVersion: "shanghai",
    // No metadata hash or CBOR trailer: the bytecode depends on the source text only through
    // the code itself, so comment edits do not churn the committed hex.
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { TestUSDC: ["evm.deployedBytecode.object"] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
for (const e of out.errors ?? []) console.error(e.formattedMessage);
if ((out.errors ?? []).some((e) => e.severity === "error")) process.exit(1);

const hex = out.contracts["TestUSDC.sol"].TestUSDC.evm.deployedBytecode.object;
mkdirSync(outDir, { recursive: true });
writeFileSync(join(outDir, "TestUSDC.runtime.hex"), hex + "\n");
console.log(`TestUSDC: ${hex.length / 2} bytes of runtime code (solc ${solc.version()})`);
