// Opens a paid URL in Debian's headless Chromium (driven by playwright-core) as a person would,
// with a test wallet injected as window.ethereum (EIP-1193) whose key is Anvil's account #1,
// keeps a screenshot, and clicks "Pay". Prints one JSON line:
//   {title, text, screenshot, paymentHeader, paidStatus, content, status, error}
// Usage: node paywall.mjs --url URL --screenshot FILE [--chromium /usr/bin/chromium]
//        [--key HEX] [--no-wallet]
// Packages come from $X402_TEST_DEPS/node (scripts/install-test-deps.sh), never from the repo.
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const require = createRequire(join(DEPS, "node", "package.json"));
const { chromium } = require("playwright-core");
const { privateKeyToAccount } = require("viem/accounts");

const ANVIL_1_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const args = { url: "", screenshot: "", chromium: process.env.X402_CHROMIUM || "/usr/bin/chromium", key: ANVIL_1_KEY, wallet: true };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === "--no-wallet") args.wallet = false;
  else if (a.startsWith("--")) args[a.slice(2)] = process.argv[++i];
}
const out = { title: null, text: null, screenshot: args.screenshot, paymentHeader: null, paidStatus: null, content: null, status: null, error: null };
const account = privateKeyToAccount(args.key);

let browser;
try {
  // The flags this machine needs (see the environment notes): no sandbox as root, no
  // background networking (the closed network refuses it).
  browser = await chromium.launch({
    executablePath: args.chromium,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(20000);
  if (args.wallet) {
    // The wallet's signing runs here in node (viem), reached from the page by a binding.
    await page.exposeFunction("__testWallet", async (method, params) => {
      if (method === "eth_requestAccounts" || method === "eth_accounts") return [account.address];
      if (method === "wallet_switchEthereumChain") return null;
      if (method === "eth_signTypedData_v4") {
        const [from, json] = params;
        if (from.toLowerCase() !== account.address.toLowerCase()) throw new Error("unknown account");
        const typed = JSON.parse(json);
        const { EIP712Domain, ...types } = typed.types;
        return account.signTypedData({ domain: typed.domain, types, primaryType: typed.primaryType, message: typed.message });
      }
      throw new Error(`unsupported ${method}`);
    });
    await page.addInitScript(() => {
      window.ethereum = { isTestWallet: true, request: ({ method, params }) => window.__testWallet(method, params || []) };
    });
  }
  page.on("request", (req) => {
    const h = req.headers()["payment-signature"];
    if (h) out.paymentHeader = h;
  });
  page.on("response", (res) => {
    if (res.request().headers()["payment-signature"]) out.paidStatus = res.status();
  });
  const res = await page.goto(args.url);
  out.status = res.status();
  out.title = await page.title();
  out.text = await page.locator("main").innerText();
  if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
  await page.click("#pay");
  if (args.wallet) {
    await page.locator("#content").waitFor({ state: "visible" });
    out.content = await page.locator("#content").innerText();
  } else {
    await page.waitForFunction(() => document.getElementById("status").textContent.length > 0);
  }
  out.statusText = await page.locator("#status").innerText();
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e);
} finally {
  if (browser) await browser.close();
}
console.log(JSON.stringify(out));
