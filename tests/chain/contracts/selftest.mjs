// Checks our Permit2 and UptoPermit2Proxy (the committed *.runtime.hex) on a fresh anvil, for the
// paths the Rust tests do not take: EIP-2098 compact and malformed signatures, ERC-1271 owners,
// the deadline, validAfter, zero owner/destination, a failing token transfer, settleWithPermit,
// invalidateUnorderedNonces and the witness-less permitTransferFrom. Run by `compile.sh` (after
// a build) and by hand: node tests/chain/contracts/selftest.mjs
// anvil and viem come from $X402_TEST_DEPS/node (default <repo>/target/test-deps,
// scripts/install-test-deps.sh). Prints one line per check; exits 1 if any fails.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const deps = resolve(process.env.X402_TEST_DEPS || join(here, "..", "..", "..", "target", "test-deps"));
const need = createRequire(join(deps, "node", "package.json"));
const viem = need("viem");
const { createTestClient, createWalletClient, createPublicClient, http, parseAbi, defineChain } = viem;
const { parseSignature, signatureToCompactSignature, decodeErrorResult, encodeFunctionData } = viem;
const { privateKeyToAccount } = need("viem/accounts");

const anvil = spawn(
  process.env.X402_ANVIL || join(deps, "node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"),
  ["--host", "127.0.0.1", "--port", "0", "--chain-id", "84532"],
  { stdio: ["ignore", "pipe", "inherit"] },
);
const rpc = await new Promise((ok, fail) => {
  let seen = "";
  anvil.on("error", fail);
  anvil.on("exit", (code) => fail(new Error(`anvil exited (${code})`)));
  anvil.stdout.on("data", (chunk) => {
    seen += chunk;
    const m = seen.match(/Listening on (\S+)/);
    if (m) ok(`http://${m[1]}`);
  });
});
try {
  await run(rpc);
} finally {
  anvil.kill();
}

async function run(rpc) {
  const chain = defineChain({
    id: 84532,
    name: "anvil",
    nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
    rpcUrls: { default: { http: [rpc] } },
  });
  const test = createTestClient({ chain, mode: "anvil", transport: http(rpc) });
  const pub = createPublicClient({ chain, transport: http(rpc) });
  const wallet = (account) => createWalletClient({ account, chain, transport: http(rpc) });
  const mined = (hash) => pub.waitForTransactionReceipt({ hash });

  const TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
  const PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3";
  const PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002";
  const FACTORY = "0x00000000000000000000000000000000fac70000";
  const ZERO = "0x0000000000000000000000000000000000000000";
  const code = (file) => `0x${readFileSync(join(here, file), "utf8").trim()}`;
  await test.setCode({ address: TOKEN, bytecode: code("TestUSDC.runtime.hex") });
  await test.setCode({ address: PERMIT2, bytecode: code("Permit2.runtime.hex") });
  await test.setCode({ address: PROXY, bytecode: code("UptoPermit2Proxy.runtime.hex") });
  await test.setCode({ address: FACTORY, bytecode: code("TestWalletFactory.runtime.hex") });

  // anvil #0 settles, #3 pays, #4 is a stranger; #2 receives.
  const facilitator = privateKeyToAccount("0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80");
  const payer = privateKeyToAccount("0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6");
  const stranger = privateKeyToAccount("0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a");
  const payTo = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

  const abi = parseAbi([
    "struct TP { address token; uint256 amount; }",
    "struct PTF { TP permitted; uint256 nonce; uint256 deadline; }",
    "struct W { address to; address facilitator; uint256 validAfter; }",
    "struct D { address to; uint256 requestedAmount; }",
    "struct E { uint256 value; uint256 deadline; bytes32 r; bytes32 s; uint8 v; }",
    "function mint(address to, uint256 value)",
    "function approve(address spender, uint256 value) returns (bool)",
    "function balanceOf(address account) view returns (uint256)",
    "function deploy(address owner, bytes32 salt) returns (address)",
    "function walletAddress(address owner, bytes32 salt) view returns (address)",
    "function settle(PTF permit, uint256 amount, address owner, W witness, bytes signature)",
    "function settleWithPermit(E permit2612, PTF permit, uint256 amount, address owner, W witness, bytes signature)",
    "function permitTransferFrom(PTF permit, D transferDetails, address owner, bytes signature)",
    "function invalidateUnorderedNonces(uint256 wordPos, uint256 mask)",
    "function nonceBitmap(address owner, uint256 wordPos) view returns (uint256)",
    "function WITNESS_TYPE_STRING() view returns (string)",
    "error AmountExceedsPermitted()",
    "error UnauthorizedFacilitator()",
    "error PaymentTooEarly()",
    "error InvalidOwner()",
    "error InvalidDestination()",
    "error Permit2612AmountMismatch()",
    "error ReentrancyGuardReentrantCall()",
    "error SignatureExpired(uint256 signatureDeadline)",
    "error InvalidNonce()",
    "error InvalidAmount(uint256 maxAmount)",
    "error InvalidSignatureLength()",
    "error InvalidSignature()",
    "error InvalidSigner()",
    "error InvalidContractSignature()",
    "error TransferFromFailed()",
  ]);
  const send = async (account, address, functionName, args) =>
    mined(await wallet(account).writeContract({ address, abi, functionName, args }));
  const read = (address, functionName, args = []) => pub.readContract({ address, abi, functionName, args });
  // "ok", or the custom error's name (and arguments) an eth_call reverts with.
  const simulate = async (address, functionName, args, from = facilitator.address) => {
    try {
      await pub.call({ account: from, to: address, data: encodeFunctionData({ abi, functionName, args }) });
      return "ok";
    } catch (e) {
      const data = e.walk?.((x) => x.data)?.data;
      try {
        const { errorName, args: values } = decodeErrorResult({ abi, data });
        return values?.length ? `${errorName}(${values.join(",")})` : errorName;
      } catch {
        return `revert ${data ?? e.shortMessage}`;
      }
    }
  };
  let failed = 0;
  const check = (what, got, want) => {
    const pass = got === want;
    if (!pass) failed++;
    console.log(`${pass ? "ok  " : "FAIL"} ${what}: ${got}${pass ? "" : ` (expected ${want})`}`);
  };

  await send(facilitator, TOKEN, "mint", [payer.address, 10n ** 9n]);
  await send(payer, TOKEN, "approve", [PERMIT2, 2n ** 256n - 1n]);

  const domain = { name: "Permit2", chainId: 84532, verifyingContract: PERMIT2 };
  const TokenPermissions = [
    { name: "token", type: "address" },
    { name: "amount", type: "uint256" },
  ];
  const witnessTypes = {
    PermitWitnessTransferFrom: [
      { name: "permitted", type: "TokenPermissions" },
      { name: "spender", type: "address" },
      { name: "nonce", type: "uint256" },
      { name: "deadline", type: "uint256" },
      { name: "witness", type: "Witness" },
    ],
    TokenPermissions,
    Witness: [
      { name: "to", type: "address" },
      { name: "facilitator", type: "address" },
      { name: "validAfter", type: "uint256" },
    ],
  };
  const now = BigInt(Math.floor(Date.now() / 1000));
  let nextNonce = 100n;
  // An upto permit (max 50000) signed by `signer`, with `change` applied to the message.
  const permit = async (change = {}, signer = payer) => {
    const message = {
      permitted: { token: TOKEN, amount: 50000n },
      spender: PROXY,
      nonce: nextNonce++,
      deadline: now + 300n,
      witness: { to: payTo, facilitator: facilitator.address, validAfter: 0n },
      ...change,
    };
    const signature = await signer.signTypedData({ domain, types: witnessTypes, primaryType: "PermitWitnessTransferFrom", message });
    return { message, signature };
  };
  const settleArgs = ({ message, signature }, amount = 12300n, owner = payer.address, sig = signature) => [
    { permitted: message.permitted, nonce: message.nonce, deadline: message.deadline },
    amount,
    owner,
    message.witness,
    sig,
  ];

  check(
    "WITNESS_TYPE_STRING",
    await read(PROXY, "WITNESS_TYPE_STRING"),
    "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)",
  );
  const p = await permit();
  check("settle", await simulate(PROXY, "settle", settleArgs(p)), "ok");
  const { r, yParityAndS } = signatureToCompactSignature(parseSignature(p.signature));
  const compact = r + yParityAndS.slice(2);
  check("EIP-2098 compact signature", await simulate(PROXY, "settle", settleArgs(p, 12300n, payer.address, compact)), "ok");
  check(
    "63-byte signature",
    await simulate(PROXY, "settle", settleArgs(p, 12300n, payer.address, compact.slice(0, -2))),
    "InvalidSignatureLength",
  );
  check(
    "v = 5",
    await simulate(PROXY, "settle", settleArgs(p, 12300n, payer.address, `${p.signature.slice(0, -2)}05`)),
    "InvalidSignature",
  );
  check("amount 0", await simulate(PROXY, "settle", settleArgs(p, 0n)), "ok");
  check("owner 0", await simulate(PROXY, "settle", settleArgs(p, 1n, ZERO)), "InvalidOwner");
  const toZero = await permit({ witness: { to: ZERO, facilitator: facilitator.address, validAfter: 0n } });
  check("witness.to 0", await simulate(PROXY, "settle", settleArgs(toZero)), "InvalidDestination");
  const expired = await permit({ deadline: now - 10n });
  check("deadline passed", await simulate(PROXY, "settle", settleArgs(expired)), `SignatureExpired(${now - 10n})`);
  const early = await permit({ witness: { to: payTo, facilitator: facilitator.address, validAfter: now + 1000n } });
  check("validAfter ahead", await simulate(PROXY, "settle", settleArgs(early)), "PaymentTooEarly");
  const big = await permit({ permitted: { token: TOKEN, amount: 10n ** 12n } });
  check("amount above the balance", await simulate(PROXY, "settle", settleArgs(big, 10n ** 11n)), "TransferFromFailed");
  const [permitArg, , , witness, signature] = settleArgs(p);
  check(
    "witness.to changed after signing",
    await simulate(PROXY, "settle", [permitArg, 12300n, payer.address, { ...witness, to: facilitator.address }, signature]),
    "InvalidSigner",
  );

  // TestUSDC has no EIP-2612 permit(): the proxy ignores the failing call, Permit2 still settles.
  const p2612 = { value: 1n, deadline: now + 100n, r: `0x${"11".repeat(32)}`, s: `0x${"22".repeat(32)}`, v: 27 };
  check("settleWithPermit, value != max", await simulate(PROXY, "settleWithPermit", [p2612, ...settleArgs(p)]), "Permit2612AmountMismatch");
  check(
    "settleWithPermit, failing permit()",
    await simulate(PROXY, "settleWithPermit", [{ ...p2612, value: 50000n }, ...settleArgs(p)]),
    "ok",
  );

  await test.impersonateAccount({ address: payer.address });
  await send(payer, PERMIT2, "invalidateUnorderedNonces", [p.message.nonce >> 8n, 1n << (p.message.nonce & 0xffn)]);
  check("nonceBitmap after invalidation", await read(PERMIT2, "nonceBitmap", [payer.address, 0n]), 1n << p.message.nonce);
  check("invalidated nonce", await simulate(PROXY, "settle", settleArgs(p)), "InvalidNonce");

  // permitTransferFrom: no witness, the spender (msg.sender) is the facilitator itself.
  const plain = { permitted: { token: TOKEN, amount: 500n }, spender: facilitator.address, nonce: 7777n, deadline: now + 100n };
  const plainSig = await payer.signTypedData({
    domain,
    types: {
      PermitTransferFrom: [
        { name: "permitted", type: "TokenPermissions" },
        { name: "spender", type: "address" },
        { name: "nonce", type: "uint256" },
        { name: "deadline", type: "uint256" },
      ],
      TokenPermissions,
    },
    primaryType: "PermitTransferFrom",
    message: plain,
  });
  const plainArgs = (requestedAmount) => [
    { permitted: plain.permitted, nonce: plain.nonce, deadline: plain.deadline },
    { to: payTo, requestedAmount },
    payer.address,
    plainSig,
  ];
  check("permitTransferFrom", await simulate(PERMIT2, "permitTransferFrom", plainArgs(400n)), "ok");
  check("permitTransferFrom, other spender", await simulate(PERMIT2, "permitTransferFrom", plainArgs(400n), payTo), "InvalidSigner");
  check("permitTransferFrom, above max", await simulate(PERMIT2, "permitTransferFrom", plainArgs(501n)), "InvalidAmount(500)");

  // An ERC-1271 owner: a TestWallet of the payer's key, funded and Permit2-approved.
  const salt = `0x${"00".repeat(32)}`;
  await send(facilitator, FACTORY, "deploy", [payer.address, salt]);
  const smart = await read(FACTORY, "walletAddress", [payer.address, salt]);
  await send(facilitator, TOKEN, "mint", [smart, 10n ** 9n]);
  await test.impersonateAccount({ address: smart });
  await test.setBalance({ address: smart, value: 10n ** 18n });
  await send(smart, TOKEN, "approve", [PERMIT2, 2n ** 256n - 1n]);
  const s = await permit();
  check("ERC-1271 owner", await simulate(PROXY, "settle", settleArgs(s, 12300n, smart)), "ok");
  const foreign = await stranger.signTypedData({ domain, types: witnessTypes, primaryType: "PermitWitnessTransferFrom", message: s.message });
  check(
    "ERC-1271 owner, another key's signature",
    await simulate(PROXY, "settle", settleArgs(s, 12300n, smart, foreign)),
    "InvalidContractSignature",
  );

  // Settling for real moves exactly the amount, once.
  const before = await read(TOKEN, "balanceOf", [payTo]);
  await send(facilitator, PROXY, "settle", settleArgs(s, 12300n, smart));
  check("settled amount received", (await read(TOKEN, "balanceOf", [payTo])) - before, 12300n);
  check("second settle of one permit", await simulate(PROXY, "settle", settleArgs(s, 1n, smart)), "InvalidNonce");
  if (failed) {
    console.log(`${failed} check(s) failed`);
    process.exitCode = 1;
  }
}
