// A local Solana chain for tower-x402's tests: litesvm (an in-process SVM with the SPL Token
// and associated-token programs) behind a small JSON-RPC server answering exactly what the
// official @x402/svm client and our SvmSettler call. Not a validator: one "block" per
// transaction, statuses kept in memory.
//
// Usage: node chain.mjs '<json setup>'; prints `listening on http://127.0.0.1:PORT` once ready.
// Setup: { mint, decimals, payer, payerBalance, feePayer, payTo? }: the mint is created at
// the given address (the real devnet USDC address works) with the payer's token account
// funded; the fee payer gets 10 SOL.
//
// Test controls (not Solana methods): x402_expireBlockhash, x402_dropNextSendReply (the next
// sendTransaction is processed but its reply is an error, as an RPC lost after submit),
// x402_loseNextSend (the next one is dropped unprocessed behind the same error), and
// x402_down (every later call fails with HTTP 503).

import http from "node:http";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// Packages come from $X402_TEST_DEPS/svm (scripts/install-test-deps.sh), never from the repo.
const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const need = createRequire(join(DEPS, "svm", "package.json"));
const { LiteSVM, FailedTransactionMetadata } = need("litesvm");
const { getBase58Decoder, getBase64Encoder, getTransactionDecoder, getBase64Decoder } = need("@solana/kit");
const { getMintEncoder, getTokenEncoder, TOKEN_PROGRAM_ADDRESS } = need("@solana-program/token");
const { findAssociatedTokenPda } = need("@solana-program/token-2022");

const setup = JSON.parse(process.argv[2] ?? "{}");
const svm = new LiteSVM();
const b58 = getBase58Decoder();
const b64 = getBase64Decoder();

const rent = (len) => svm.minimumBalanceForRentExemption(BigInt(len));
const put = (address, data, owner) =>
  svm.setAccount({
    address,
    data,
    executable: false,
    lamports: rent(data.length),
    programAddress: owner,
    space: BigInt(data.length),
  });

async function ata(owner) {
  const [address] = await findAssociatedTokenPda({
    mint: setup.mint,
    owner,
    tokenProgram: TOKEN_PROGRAM_ADDRESS,
  });
  return address;
}

async function tokenAccount(owner, amount) {
  const address = await ata(owner);
  const data = getTokenEncoder().encode({
    mint: setup.mint,
    owner,
    amount: BigInt(amount),
    delegate: null,
    state: 1,
    isNative: null,
    delegatedAmount: 0n,
    closeAuthority: null,
  });
  put(address, new Uint8Array(data), TOKEN_PROGRAM_ADDRESS);
  return address;
}

if (setup.mint) {
  const data = getMintEncoder().encode({
    mintAuthority: setup.feePayer,
    supply: BigInt(setup.payerBalance ?? 0),
    decimals: setup.decimals ?? 6,
    isInitialized: true,
    freezeAuthority: null,
  });
  put(setup.mint, new Uint8Array(data), TOKEN_PROGRAM_ADDRESS);
  await tokenAccount(setup.payer, setup.payerBalance ?? 0);
  if (setup.payTo) await tokenAccount(setup.payTo, 0);
}
if (setup.feePayer) svm.airdrop(setup.feePayer, 10_000_000_000n);
if (setup.payer) svm.airdrop(setup.payer, 1_000_000_000n);

let slot = 1;
const valid = new Set([svm.latestBlockhash()]);
const statuses = new Map();
let dropNextSendReply = false;
let loseNextSend = false;
let down = false;

const context = () => ({ slot, apiVersion: "2.2.0" });

class RpcError extends Error {
  constructor(code, message, data) {
    super(message);
    this.code = code;
    this.data = data;
  }
}

function decodeTx(encoded, encoding) {
  const bytes =
    encoding === "base58"
      ? Uint8Array.from(Buffer.from(encoded, "base64"))
      : Uint8Array.from(getBase64Encoder().encode(encoded));
  return getTransactionDecoder().decode(bytes);
}

function errText(result) {
  try {
    return result.toString();
  } catch {
    return String(result.err());
  }
}

const methods = {
  getLatestBlockhash: () => ({
    context: context(),
    value: { blockhash: svm.latestBlockhash(), lastValidBlockHeight: slot + 150 },
  }),
  isBlockhashValid: ([hash]) => ({ context: context(), value: valid.has(hash) && hash === svm.latestBlockhash() }),
  getSlot: () => slot,
  getBlockHeight: () => slot,
  getBalance: ([address]) => ({ context: context(), value: Number(svm.getBalance(address) ?? 0n) }),
  getAccountInfo: ([address]) => {
    const acc = svm.getAccount(address);
    if (!acc.exists) return { context: context(), value: null };
    return {
      context: context(),
      value: {
        data: [b64.decode(acc.data), "base64"],
        executable: acc.executable,
        lamports: Number(acc.lamports),
        owner: acc.programAddress,
        rentEpoch: 0,
        space: Number(acc.data.length),
      },
    };
  },
  getTokenAccountBalance: ([address]) => {
    const acc = svm.getAccount(address);
    if (!acc.exists) throw new RpcError(-32602, "Invalid param: could not find account");
    const amount = Buffer.from(acc.data).readBigUInt64LE(64);
    return {
      context: context(),
      value: { amount: amount.toString(), decimals: setup.decimals ?? 6, uiAmount: null, uiAmountString: "" },
    };
  },
  simulateTransaction: ([encoded, config]) => {
    const tx = decodeTx(encoded, config?.encoding);
    // `sigVerify` defaults to false in Solana's RPC: the reference facilitator simulates the
    // client's transaction before it co-signs. Synchronous, so no other call sees the switch.
    const verify = config?.sigVerify === true;
    svm.withSigverify(verify);
    let result;
    try {
      result = svm.simulateTransaction(tx);
    } finally {
      svm.withSigverify(true);
    }
    if (result instanceof FailedTransactionMetadata) {
      return { context: context(), value: { err: errText(result), logs: result.meta().logs(), unitsConsumed: 0 } };
    }
    return { context: context(), value: { err: null, logs: result.meta().logs(), unitsConsumed: Number(result.meta().computeUnitsConsumed()) } };
  },
  sendTransaction: ([encoded, config]) => {
    const tx = decodeTx(encoded, config?.encoding);
    const signature = Object.values(tx.signatures)[0];
    if (!signature) throw new RpcError(-32602, "missing fee payer signature");
    const id = b58.decode(signature);
    if (loseNextSend) {
      loseNextSend = false;
      throw new RpcError(-32603, "request timed out (injected; the transaction never lands)");
    }
    if (statuses.has(id)) throw new RpcError(-32002, "Transaction simulation failed: This transaction has already been processed");
    const result = svm.sendTransaction(tx);
    if (result instanceof FailedTransactionMetadata) {
      throw new RpcError(-32002, `Transaction simulation failed: ${errText(result)}`, { logs: result.meta().logs() });
    }
    slot += 1;
    statuses.set(id, { slot, confirmations: null, err: null, status: { Ok: null }, confirmationStatus: "finalized" });
    if (dropNextSendReply) {
      dropNextSendReply = false;
      throw new RpcError(-32603, "connection reset after submit (injected)");
    }
    return id;
  },
  getSignatureStatuses: ([ids]) => ({ context: context(), value: ids.map((id) => statuses.get(id) ?? null) }),
  x402_expireBlockhash: () => {
    svm.expireBlockhash();
    valid.clear();
    valid.add(svm.latestBlockhash());
    return svm.latestBlockhash();
  },
  x402_dropNextSendReply: () => {
    dropNextSendReply = true;
    return true;
  },
  x402_loseNextSend: () => {
    loseNextSend = true;
    return true;
  },
  x402_down: () => {
    down = true;
    return true;
  },
  x402_tokenBalance: async ([owner]) => {
    const acc = svm.getAccount(await ata(owner));
    return acc.exists ? Buffer.from(acc.data).readBigUInt64LE(64).toString() : null;
  },
};

async function answer(req) {
  const method = methods[req.method];
  if (!method) return { jsonrpc: "2.0", id: req.id, error: { code: -32601, message: `Method not found: ${req.method}` } };
  try {
    return { jsonrpc: "2.0", id: req.id, result: await method(req.params ?? []) };
  } catch (e) {
    return {
      jsonrpc: "2.0",
      id: req.id,
      error: { code: e.code ?? -32603, message: e.message, ...(e.data ? { data: e.data } : {}) },
    };
  }
}

const server = http.createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", async () => {
    if (down) {
      res.writeHead(503).end();
      return;
    }
    let parsed;
    try {
      parsed = JSON.parse(body);
    } catch {
      res.writeHead(400).end();
      return;
    }
    const reply = Array.isArray(parsed) ? await Promise.all(parsed.map(answer)) : await answer(parsed);
    const text = JSON.stringify(reply);
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    res.end(text);
  });
});
server.listen(0, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
