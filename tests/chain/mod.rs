//! A local chain for the on-chain tests: anvil (chain id 84532, Base Sepolia's) on a free
//! loopback port, with our `tests/chain/contracts/TestUSDC.sol` runtime bytecode etched at the Base Sepolia
//! USDC address, so payments signed for `Asset::usdc_base_sepolia()` settle on it unchanged.
//! 1000 test USDC are minted to anvil accounts #1, #3 and #4. `MiniMulticall3` (the
//! `aggregate3` subset of Multicall3, `tests/chain/contracts/MiniMulticall3.sol`) is etched at
//! the canonical Multicall3 address, where batched settlements find it on real chains.
//! For the x402 `upto` scheme, our Permit2 (its signature-transfer half, hashing exactly like
//! the canonical one) is etched at [`PERMIT2`] and our upto Permit2 proxy (the canonical
//! proxy's ABI and checks) at [`UPTO_PROXY`]; [`upto`] (`tests/common/upto.rs`) signs the
//! client's Permit2 message and encodes `settle`. For `batch-settlement`, our own escrow and
//! ERC-3009 deposit collector (written from the spec) are etched at the canonical
//! [`BATCH_SETTLEMENT`] and [`ERC3009_DEPOSIT_COLLECTOR`] addresses, and our Permit2 deposit
//! collector at [`PERMIT2_DEPOSIT_COLLECTOR`]. Where the bytecode comes
//! from: `tests/chain/contracts/SOURCES.md`.
//! Dropping the [`Chain`] kills anvil.
//!
//! anvil comes from the npm package `@foundry-rs/anvil-linux-amd64` (pinned in
//! `scripts/install-test-deps.sh`) under `$X402_TEST_DEPS` (default `<repo>/target/test-deps`);
//! `X402_ANVIL` overrides the binary. When it is missing the tests print a loud SKIPPED and
//! return, except under `CI=true`, where they fail.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use alloy_network::TransactionBuilder;
use alloy_primitives::{Address, B256, Bytes, U256, address};
use alloy_provider::{DynProvider, Provider, RootProvider};
use alloy_sol_types::{SolCall, sol};
use serde_json::{Value, json};

// A test with both `chain` and `common` (which declares it too) loads it twice: harmless.
#[allow(clippy::duplicate_mod)]
#[path = "../common/process.rs"]
pub mod process;
#[path = "../common/upto.rs"]
pub mod upto;
pub use upto::{PERMIT2, UPTO_PROXY};

sol! {
    function mint(address to, uint256 value) external;
    function transfer(address to, uint256 value) external returns (bool);
    function balanceOf(address account) external view returns (uint256);
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
    function approve(address spender, uint256 value) external returns (bool);
    function allowance(address owner, address spender) external view returns (uint256);
    function nonceBitmap(address owner, uint256 wordPos) external view returns (uint256);
}

/// The Base Sepolia USDC address, where the test token is etched.
pub const TOKEN: Address = address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e");
/// Anvil account #0: the relayer.
pub const RELAYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Anvil account #0's address.
pub const RELAYER: Address = address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
/// Anvil account #2: receives the payments.
pub const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
/// Anvil account #3 (funded).
pub const PAYER3_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
/// Anvil account #4 (funded).
pub const PAYER4_KEY: &str = "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a";
/// Accounts #1, #3 and #4, funded with [`MINTED`] each.
pub const FUNDED: [Address; 3] = [
    address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    address!("0x90F79bf6EB2c4f870365E785982E1f101E93b906"),
    address!("0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"),
];
/// Test USDC units minted to each funded account (1000 USDC).
pub const MINTED: u64 = 1_000_000_000;
/// Anvil account #9 (unlocked): sends the setup transactions, so the relayer's nonce is the
/// settler's alone.
const MINTER: Address = address!("0xa0Ee7A142d267C1f36714E4a8F75612F20a79720");

/// Multicall3's address on every chain (Base and Base Sepolia included).
pub const MULTICALL3: Address = address!("0xcA11bde05977b3631167028862bE2a173976CA11");

const TOKEN_HEX: &str = include_str!("contracts/TestUSDC.runtime.hex");
const MULTICALL_HEX: &str = include_str!("contracts/MiniMulticall3.runtime.hex");
const PERMIT2_HEX: &str = include_str!("contracts/Permit2.runtime.hex");
const UPTO_PROXY_HEX: &str = include_str!("contracts/UptoPermit2Proxy.runtime.hex");
/// The canonical x402BatchSettlement address, where our own `BatchSettlement.sol` is etched.
pub const BATCH_SETTLEMENT: Address = address!("0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003");
/// The canonical ERC3009DepositCollector address, where our own collector is etched.
pub const ERC3009_DEPOSIT_COLLECTOR: Address =
    address!("0x4020806089470a89826cB9fB1f4059150b550004");
const BATCH_SETTLEMENT_HEX: &str = include_str!("contracts/BatchSettlement.runtime.hex");
const ERC3009_COLLECTOR_HEX: &str = include_str!("contracts/ERC3009DepositCollector.runtime.hex");
/// The canonical Permit2DepositCollector address, where our own collector is etched.
pub const PERMIT2_DEPOSIT_COLLECTOR: Address =
    address!("0x4020425FAf3B746C082C2f942b4E5159887B0005");
const PERMIT2_COLLECTOR_HEX: &str = include_str!("contracts/Permit2DepositCollector.runtime.hex");
/// The proxy's reentrancy flag (slot 0): 0 already counts as "not entered"; the harness writes
/// 1 (NOT_ENTERED), what a deployed proxy holds, so settlement gas is the steady-state one.
const REENTRANCY_GUARD_SLOT: B256 = B256::ZERO;

/// A running anvil with the token; killed on drop (with its [`process::Server`]).
pub struct Chain {
    anvil: process::Server,
    url: String,
    provider: DynProvider,
}

fn anvil_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("X402_ANVIL") {
        return bin.into();
    }
    process::deps_dir().join("node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
}

impl Chain {
    /// Starts a fresh chain, or returns `None` after a loud SKIPPED line when anvil is not
    /// installed (panics instead under `CI=true`).
    pub async fn start(test: &str) -> Option<Chain> {
        Self::start_with(test, &[]).await
    }

    /// [`Self::start`] with extra anvil arguments (`--block-time 2`, `--gas-limit N`, ...).
    pub async fn start_with(test: &str, extra: &[&str]) -> Option<Chain> {
        let bin = anvil_bin();
        if !bin.is_file() {
            process::skip(format_args!("{test}: anvil not found at {}", bin.display()));
            return None;
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--chain-id", "84532"]);
        cmd.args(extra);
        // anvil prints a banner first; its address comes with `Listening on`.
        let (anvil, url) =
            process::Server::start_until("anvil", &mut cmd, Duration::from_secs(30), |line| {
                line.strip_prefix("Listening on ")
                    .map(|addr| format!("http://{}", addr.trim()))
            });
        let provider = RootProvider::connect(&url)
            .await
            .expect("anvil url")
            .erased();
        let chain = Chain {
            anvil,
            url,
            provider,
        };
        for (at, hex) in [
            (TOKEN, TOKEN_HEX),
            (MULTICALL3, MULTICALL_HEX),
            (PERMIT2, PERMIT2_HEX),
            (UPTO_PROXY, UPTO_PROXY_HEX),
            (BATCH_SETTLEMENT, BATCH_SETTLEMENT_HEX),
            (ERC3009_DEPOSIT_COLLECTOR, ERC3009_COLLECTOR_HEX),
            (PERMIT2_DEPOSIT_COLLECTOR, PERMIT2_COLLECTOR_HEX),
        ] {
            let code = format!("0x{}", hex.trim());
            let _: Value = chain
                .provider
                .raw_request("anvil_setCode".into(), (at, code))
                .await
                .expect("anvil_setCode");
        }
        let _: Value = chain
            .provider
            .raw_request(
                "anvil_setStorageAt".into(),
                (UPTO_PROXY, REENTRANCY_GUARD_SLOT, B256::with_last_byte(1)),
            )
            .await
            .expect("anvil_setStorageAt");
        for who in FUNDED {
            chain.mint(who, U256::from(MINTED)).await;
        }
        Some(chain)
    }

    /// The JSON-RPC URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What anvil printed so far (for failure messages).
    pub fn log(&self) -> String {
        self.anvil.log()
    }

    /// A provider on the chain.
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// Places runtime bytecode (hex, with or without `0x`) at `at` (`anvil_setCode`).
    pub async fn set_code(&self, at: Address, hex: &str) {
        let code = format!("0x{}", hex.trim().trim_start_matches("0x"));
        let _: Value = self
            .provider
            .raw_request("anvil_setCode".into(), (at, code))
            .await
            .expect("anvil_setCode");
    }

    /// Mints test USDC to `to` (a transaction from account #9, mined before returning).
    pub async fn mint(&self, to: Address, value: U256) {
        let data = Bytes::from(mintCall { to, value }.abi_encode());
        self.send_as(MINTER, TOKEN, data).await;
    }

    /// Sends a transaction from an unlocked anvil account and waits for its successful receipt.
    pub async fn send_as(&self, from: Address, to: Address, data: Bytes) -> B256 {
        let hash: B256 = self
            .provider
            .raw_request(
                "eth_sendTransaction".into(),
                (json!({ "from": from, "to": to, "data": data }),),
            )
            .await
            .expect("eth_sendTransaction");
        // 30 s: a chain started with `--block-time` mines only every few seconds.
        for _ in 0..1500 {
            if let Some(receipt) = self
                .provider
                .get_transaction_receipt(hash)
                .await
                .expect("receipt")
            {
                assert!(receipt.status(), "setup transaction {hash} reverted");
                return hash;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("setup transaction {hash} was not mined");
    }

    /// The gas a mined transaction used.
    pub async fn gas_used(&self, hash: B256) -> u64 {
        self.provider
            .get_transaction_receipt(hash)
            .await
            .expect("receipt")
            .expect("mined")
            .gas_used
    }

    /// The token balance of `who`.
    pub async fn balance(&self, who: Address) -> U256 {
        let out = self.view(balanceOfCall { account: who }).await;
        balanceOfCall::abi_decode_returns(&out).expect("balanceOf")
    }

    /// `owner` approves [`PERMIT2`] for `type(uint256).max` on the token (the one-time setup of
    /// a Permit2 payer), sent as `owner` through anvil's impersonation and mined before
    /// returning.
    pub async fn approve_permit2(&self, owner: Address) {
        let _: Value = self
            .provider
            .raw_request("anvil_impersonateAccount".into(), (owner,))
            .await
            .expect("anvil_impersonateAccount");
        if self
            .provider
            .get_balance(owner)
            .await
            .expect("eth_getBalance")
            < U256::from(10).pow(U256::from(17))
        {
            let _: Value = self
                .provider
                .raw_request(
                    "anvil_setBalance".into(),
                    (owner, U256::from(10).pow(U256::from(18))),
                )
                .await
                .expect("anvil_setBalance");
        }
        let data = Bytes::from(
            approveCall {
                spender: PERMIT2,
                value: U256::MAX,
            }
            .abi_encode(),
        );
        self.send_as(owner, TOKEN, data).await;
        let _: Value = self
            .provider
            .raw_request("anvil_stopImpersonatingAccount".into(), (owner,))
            .await
            .expect("anvil_stopImpersonatingAccount");
    }

    /// The token allowance `owner` gave `spender`.
    pub async fn allowance(&self, owner: Address, spender: Address) -> U256 {
        let out = self.view(allowanceCall { owner, spender }).await;
        allowanceCall::abi_decode_returns(&out).expect("allowance")
    }

    /// Whether Permit2 has consumed `owner`'s unordered `nonce`: bit `nonce & 0xff` of
    /// `nonceBitmap(owner, nonce >> 8)`.
    pub async fn permit2_nonce_used(&self, owner: Address, nonce: U256) -> bool {
        let call = nonceBitmapCall {
            owner,
            wordPos: nonce >> 8,
        };
        let out = self
            .call_as(Address::ZERO, PERMIT2, call.abi_encode().into())
            .await
            .unwrap_or_else(|revert| panic!("nonceBitmap reverted: {revert:?}"));
        let word = nonceBitmapCall::abi_decode_returns(&out).expect("nonceBitmap");
        let bit = nonce & U256::from(0xff);
        (word >> bit) & U256::from(1) == U256::from(1)
    }

    /// `eth_call` of `data` from `from` to `to` on the latest block: the return data, or
    /// `Err(revert data)` when it reverts (`Err(None)`: the node gave no revert data).
    pub async fn call_as(
        &self,
        from: Address,
        to: Address,
        data: Bytes,
    ) -> Result<Bytes, Option<Bytes>> {
        let tx = alloy_rpc_types_eth::TransactionRequest::default()
            .with_from(from)
            .with_to(to)
            .with_input(data);
        self.provider
            .call(tx)
            .block(alloy_rpc_types_eth::BlockId::latest())
            .await
            .map_err(|e| e.as_error_resp().and_then(|resp| resp.as_revert_data()))
    }

    /// `authorizationState(from, nonce)` on the token.
    pub async fn authorization_used(&self, from: Address, nonce: B256) -> bool {
        let out = self
            .view(authorizationStateCall {
                authorizer: from,
                nonce,
            })
            .await;
        authorizationStateCall::abi_decode_returns(&out).expect("authorizationState")
    }

    /// Turns anvil's automine off (transactions wait in the pool) or back on.
    pub async fn set_automine(&self, on: bool) {
        let _: Value = self
            .provider
            .raw_request("evm_setAutomine".into(), (on,))
            .await
            .expect("evm_setAutomine");
    }

    /// Mines one block.
    pub async fn mine(&self) {
        let _: Value = self
            .provider
            .raw_request("evm_mine".into(), ())
            .await
            .expect("evm_mine");
    }

    /// Mines `n` blocks.
    pub async fn mine_blocks(&self, n: u64) {
        let _: Value = self
            .provider
            .raw_request("anvil_mine".into(), (U256::from(n),))
            .await
            .expect("anvil_mine");
    }

    /// The head's number.
    pub async fn head(&self) -> u64 {
        self.provider
            .get_block_number()
            .await
            .expect("eth_blockNumber")
    }

    /// Takes a state snapshot (`evm_snapshot`) to [`revert`](Self::revert) to.
    pub async fn snapshot(&self) -> U256 {
        self.provider
            .raw_request("evm_snapshot".into(), ())
            .await
            .expect("evm_snapshot")
    }

    /// Rolls the chain back to `snapshot` (`evm_revert`): later blocks and their transactions
    /// are gone.
    pub async fn revert(&self, snapshot: U256) {
        let ok: bool = self
            .provider
            .raw_request("evm_revert".into(), (snapshot,))
            .await
            .expect("evm_revert");
        assert!(ok, "evm_revert to {snapshot} refused");
    }

    /// A reorg of the last `depth` blocks (`anvil_reorg`): they are replaced by as many new,
    /// empty blocks (same height, other hashes); their transactions are dropped, not put back
    /// in the pool (anvil 1.x).
    pub async fn reorg(&self, depth: u64) {
        let _: Value = self
            .provider
            .raw_request("anvil_reorg".into(), (depth, Vec::<Value>::new()))
            .await
            .expect("anvil_reorg");
    }

    /// [`Self::reorg`] of the last `depth` blocks, the first new block carrying `txs`
    /// (transaction requests from unlocked accounts: `{"from", "to", "data"}`).
    pub async fn reorg_with(&self, depth: u64, txs: Vec<Value>) {
        let pairs: Vec<Value> = txs.into_iter().map(|tx| json!([tx, 0])).collect();
        let _: Value = self
            .provider
            .raw_request("anvil_reorg".into(), (depth, pairs))
            .await
            .expect("anvil_reorg");
    }

    /// Sets the block gas limit of the next blocks (`evm_setBlockGasLimit`).
    pub async fn set_block_gas_limit(&self, gas: u64) {
        let ok: bool = self
            .provider
            .raw_request("evm_setBlockGasLimit".into(), (U256::from(gas),))
            .await
            .expect("evm_setBlockGasLimit");
        assert!(ok, "evm_setBlockGasLimit refused");
    }

    /// The hashes of the transactions waiting in anvil's pool (`txpool_content`, pending).
    pub async fn pool(&self) -> Vec<B256> {
        let content: Value = self
            .provider
            .raw_request("txpool_content".into(), ())
            .await
            .expect("txpool_content");
        let mut out = Vec::new();
        for by_nonce in content["pending"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            for tx in by_nonce.as_object().into_iter().flat_map(|m| m.values()) {
                if let Some(hash) = tx["hash"].as_str().and_then(|h| h.parse().ok()) {
                    out.push(hash);
                }
            }
        }
        out
    }

    /// How many `AuthorizationUsed(from, nonce)` logs the token emitted on the canonical chain
    /// (all blocks): one per transfer that moved the money.
    pub async fn authorization_used_logs(&self, from: Address, nonce: B256) -> usize {
        let filter = alloy_rpc_types_eth::Filter::new()
            .address(TOKEN)
            .from_block(0)
            .event_signature(alloy_primitives::keccak256(
                "AuthorizationUsed(address,bytes32)",
            ))
            .topic1(from.into_word())
            .topic2(nonce);
        self.provider
            .get_logs(&filter)
            .await
            .expect("eth_getLogs")
            .len()
    }

    async fn view(&self, call: impl SolCall) -> Bytes {
        let tx = alloy_rpc_types_eth::TransactionRequest::default()
            .with_to(TOKEN)
            .with_input(call.abi_encode());
        // The latest block: anvil reads `pending` state when the block is omitted.
        self.provider
            .call(tx)
            .block(alloy_rpc_types_eth::BlockId::latest())
            .await
            .expect("eth_call")
    }
}

/// A loopback URL where nothing listens.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A TCP proxy on loopback in front of an RPC that the test can cut (every connection, open
/// or new, is dropped) and restore: an RPC outage without touching anvil.
pub struct RpcProxy {
    url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    methods: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RpcProxy {
    /// Forwards to `target` (an `http://host:port` URL).
    pub async fn start(target: &str) -> RpcProxy {
        use std::sync::atomic::Ordering;
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let methods = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let (up2, conns2, methods2) = (up.clone(), conns.clone(), methods.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let (target, methods) = (target.clone(), methods2.clone());
                let task = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.split();
                    let (mut from_server, mut to_server) = tokio::io::split(server);
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                            count_methods(&buf[..n], &methods);
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut from_server, &mut to_client);
                    tokio::select! {
                        () = up => {}
                        _ = down => {}
                    }
                });
                let mut conns = conns2.lock().expect("proxy lock");
                conns.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                conns.push(task);
            }
        });
        RpcProxy {
            url,
            up,
            methods,
            conns,
            accept,
        }
    }

    /// The proxy's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many JSON-RPC calls of `method` went through so far (read from the requests).
    pub fn calls(&self, method: &str) -> u64 {
        let methods = self.methods.lock().expect("proxy lock");
        methods.get(method).copied().unwrap_or(0)
    }

    /// Cuts the RPC: open connections are dropped, new ones closed at once.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.conns.lock().expect("proxy lock").drain(..) {
            task.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Counts the `"method":"..."` of the JSON-RPC requests in `chunk` (requests are small and
/// sent in one write: one chunk holds each whole).
fn count_methods(chunk: &[u8], methods: &std::sync::Mutex<std::collections::HashMap<String, u64>>) {
    const KEY: &[u8] = b"\"method\":\"";
    let mut rest = chunk;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let end = rest.iter().position(|b| *b == b'"').unwrap_or(rest.len());
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        *methods.lock().expect("proxy lock").entry(name).or_default() += 1;
        rest = &rest[end..];
    }
}
