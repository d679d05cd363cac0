//! Load harness (issue #8): one command measures, back to back on the same two cores, every
//! path a paid API takes, each against a baseline taken in the same run.
//!
//! ```sh
//! scripts/bench-load            # full run (release build, peer build, anvil, redis, 1M requests)
//! scripts/bench-load --smoke    # a few seconds: every scenario once, status codes checked
//! ```
//!
//! The servers run as child processes of this binary (`load serve <scenario>`), pinned to
//! core 1 with `taskset`, on one tokio thread. The load generator is this process on core 0:
//! a closed loop over N keep-alive HTTP/1.1 connections (hyper), fed pre-signed unique
//! payment headers (signing is the client's cost, so it happens before the run). Scenarios:
//!
//! * `bare`: axum `GET /weather` → "hello", no layer (the HTTP baseline);
//! * `challenge`: the same route behind `PaymentLayer`, no payment → 402 challenge;
//! * `paid-memory`: a valid unique payment per request → 200, `MemoryNonceStore`, verify-only;
//! * `bound`: the same with bound challenges (`bind_challenges`, fixed key, 1 h time to live):
//!   every payment echoes the challenge id and `resource` of one 402 fetched from the server;
//! * `paid-svm`: a Solana `exact` payment per request (pre-built transactions, distinct memos)
//!   → 200, `SvmVerifier` in-process, `MemoryNonceStore`, no settlement, no RPC; against its
//!   own limit, a loop of the ed25519 verifications it makes (`svm-verify`, core 1);
//! * `paid-redis`: the same with `RedisNonceStore` on a local `redis-server` (pinned to core 0);
//! * `voucher-memory`, `voucher-redis`: paid by `batch-settlement` vouchers (issue #19), with
//!   `MemoryChannelStore` / `RedisChannelStore`: the channels are seeded into the store at
//!   start (deposit mirrored), the escrow is absent (no RPC per request), each connection
//!   walks one channel's pre-signed cumulative vouchers;
//! * `paid-deferred`: the same with `DeferredSettler` over `OnchainSettler` (Multicall3
//!   batches) on a local anvil (core 0), pre-check on as a seller runs it: each request reads
//!   the payer's balance and the nonce's state on-chain, then is journaled (fdatasync, in a
//!   temp dir) before the handler's answer goes out; the worker settles in the background.
//!   After the load the harness waits for the payee's on-chain balance to reach one price per
//!   200 served, so every answered request is shown to have settled;
//! * `deferred-optimistic`: the same with `precheck(false)` (no RPC on the request path);
//! * `deferred tmpfs`, `deferred-opt tmpfs`: both again with the journal on `/dev/shm`, where
//!   `fdatasync` is free: what the settler itself adds, as on a disk with fast syncs;
//! * `peer`: the same paid route behind the Rust peer x402-axum (bench/peer, built separately,
//!   verification through its in-process facilitator against a local anvil on core 0);
//! * `recover`: a raw libsecp256k1 recovery loop on core 1 (the physical limit of the paid path).
//!
//! Each scenario reports throughput with N connections (req/s, p50/p99, server CPU) and the
//! latency of one connection alone (p50/p99 unloaded). The machine is shared and noisy, so the
//! results that matter are the ratios against baselines measured in the same run, and the
//! server's CPU time per request (less sensitive to neighbours than req/s).
//!
//! Then, unless `--no-million`: one million distinct paid requests against a fresh
//! memory-store server, with 10 s validity so entries expire and are swept; the server's RSS
//! is printed along the way and must stay bounded.

#[path = "../tests/chain/mod.rs"]
mod chain;

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_provider::Provider as _;
use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use secp256k1::{Message, SECP256K1, SecretKey};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tower_x402::nonce::{MemoryNonceStore, RedisNonceStore};
use tower_x402::primitives::{Address, B256, Bytes as ABytes, U256, address};
use tower_x402::proto::exact::{Authorization, ExactEvmPayload};
use tower_x402::proto::header::{PAYMENT_REQUIRED, PAYMENT_SIGNATURE};
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::proto::v2::{PaymentRequired, ResourceInfo};
use tower_x402::settle::deferred::DeferredSettler;
use tower_x402::settle::onchain::OnchainSettler;
use tower_x402::svm::{self, Keypair, SvmAsset, SvmVerifier};
use tower_x402::test_util::{
    DEMO_PAYER_KEY, PrivateKeySigner, demo_payer, encode, random_nonce, v2_json,
};
use tower_x402::verify::exact::{domain_separator, recover_signer, signing_hash};
use tower_x402::{Asset, ChallengeKeys, Network, PaymentLayer, PaymentOption};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Anvil account #2 (public test address): receives the payments.
const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
const PRICE: &str = "$0.001";
const PATH: &str = "/weather";
/// CPU a `bare-spin` handler burns per request (about a paid request's user time).
const SPIN: Duration = Duration::from_micros(40);
/// Signatures `bare-recover-fresh` signs at start and cycles through (~10 MB, as many as the
/// nonces a paid run's memory store holds).
const FRESH_SIGNATURES: usize = 100_000;
/// The `bound` server's challenge key (a benchmark's, not a secret).
const BENCH_CHALLENGE_KEY: [u8; 32] = [0x42; 32];

// ------------------------------------------------------------------------------------------------
// Configuration

struct Config {
    smoke: bool,
    conns: usize,
    warmup: Duration,
    measure: Duration,
    latency: Duration,
    recover: Duration,
    /// Pre-signed headers per paid scenario (the run stops early if they run out).
    headers: usize,
    million: bool,
    peer: Option<String>,
    /// Whether taskset is used to pin (`--no-pin` or missing taskset disables it).
    pin: bool,
}

impl Config {
    fn from_args(args: &[String]) -> Result<Self, BoxError> {
        let smoke = args.iter().any(|a| a == "--smoke");
        let value = |name: &str| -> Option<&String> {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
        };
        let secs = |name: &str, default: f64| -> Result<Duration, BoxError> {
            Ok(Duration::from_secs_f64(match value(name) {
                Some(v) => v.parse()?,
                None => default,
            }))
        };
        let cfg = if smoke {
            Config {
                smoke,
                conns: 4,
                warmup: Duration::from_millis(50),
                measure: secs("--measure", 0.3)?,
                latency: Duration::from_millis(100),
                recover: Duration::from_millis(200),
                headers: 400,
                million: false,
                peer: None,
                pin: false,
            }
        } else {
            Config {
                smoke,
                conns: value("--conns").map_or(Ok(32), |v| v.parse())?,
                warmup: secs("--warmup", 1.0)?,
                measure: secs("--measure", 4.0)?,
                latency: secs("--latency", 1.5)?,
                recover: secs("--recover", 3.0)?,
                headers: value("--headers").map_or(Ok(200_000), |v| v.parse())?,
                million: !args.iter().any(|a| a == "--no-million"),
                peer: value("--peer").cloned(),
                pin: true,
            }
        };
        let have_taskset = Command::new("taskset")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Ok(Config {
            pin: cfg.pin && have_taskset && !args.iter().any(|a| a == "--no-pin"),
            ..cfg
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Entry point

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("recover") => recover_loop(&args[1..]),
        Some("svm-verify") => svm_verify_loop(&args[1..]),
        Some("challenge-check") => challenge_check(&args[1..]),
        Some("kernel") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tokio::task::LocalSet::new().run_until(kernel(&args[1..]))),
        Some("http-count") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tokio::task::LocalSet::new().run_until(http_count(&args[1..]))),
        _ => {
            let cfg = Config::from_args(&args)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(tokio::task::LocalSet::new().run_until(drive(cfg)))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Servers (child processes)

fn layer(
    store: Option<RedisNonceStore>,
    deferred: Option<DeferredSettler>,
) -> Result<PaymentLayer, BoxError> {
    layer_with(store, deferred, None)
}

/// The layer of `bound`: challenges bound with a fixed key and a long time to live, so the
/// harness can sign every payment of a run against the one challenge it fetched at start.
fn bound_layer() -> Result<PaymentLayer, BoxError> {
    let keys = ChallengeKeys::new(BENCH_CHALLENGE_KEY).with_ttl(Duration::from_secs(3600));
    layer_with(None, None, Some(keys))
}

fn layer_with(
    store: Option<RedisNonceStore>,
    deferred: Option<DeferredSettler>,
    challenges: Option<ChallengeKeys>,
) -> Result<PaymentLayer, BoxError> {
    let builder = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(Network::BASE_SEPOLIA);
    let builder = match challenges {
        Some(keys) => builder.bind_challenges(keys),
        // Payloads are signed before timing starts, from requirements built here, not a 402.
        None => builder.no_challenge_binding(),
    };
    let builder = match store {
        Some(redis) => builder.nonce_store(redis),
        None => builder.nonce_store(MemoryNonceStore::new()),
    };
    let builder = match deferred {
        Some(settler) => builder.settler(settler),
        None => builder,
    };
    Ok(builder.build()?)
}

/// The deferred settler of `paid-deferred` / `deferred-optimistic`: `OnchainSettler` on the
/// harness's anvil (anvil account #0 relays), journal at `--journal`, defaults otherwise
/// (batches of 32) except `--max-wait-ms` (the smoke run shortens it to drain quickly).
async fn deferred_settler(
    value: &dyn Fn(&str) -> Option<String>,
    precheck: bool,
) -> Result<DeferredSettler, BoxError> {
    let rpc = value("--rpc").ok_or("deferred scenarios need --rpc URL")?;
    let journal = value("--journal").ok_or("deferred scenarios need --journal PATH")?;
    let relayer: PrivateKeySigner = chain::RELAYER_KEY.parse()?;
    let onchain = OnchainSettler::connect(&rpc, relayer).await?;
    let mut builder = DeferredSettler::builder(onchain)
        .journal(journal)
        .precheck(precheck);
    if let Some(ms) = value("--max-wait-ms") {
        builder = builder.max_wait(Duration::from_millis(ms.parse()?));
    }
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = failed.clone();
    builder = builder.on_outcome(move |o| {
        if !o.is_settled() && sink.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            let _ = writeln!(std::io::stderr(), "deferred: first failed outcome: {o:?}");
        }
    });
    Ok(builder.start()?)
}

/// A route whose handler recovers one of `count` signatures made at start, in turn, and
/// nothing else (`bare-recover`: one, repeated; `bare-recover-fresh`: a new one each request).
fn recover_router(count: usize) -> Router {
    let signer = FastSigner::new(option().requirements().clone());
    let now = unix_now();
    let made: Arc<[(B256, ABytes)]> = (0..count)
        .map(|_| {
            let p = signer.payload(now, 300);
            (
                signing_hash(signer.separator, &p.authorization),
                p.signature,
            )
        })
        .collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Router::new().route(
        PATH,
        get(move || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (digest, sig) = &made[i % made.len()];
            let ok = recover_signer(*digest, sig).is_ok();
            async move { if ok { "hello" } else { "bad" } }
        }),
    )
}

/// `load serve <scenario> [--redis URL] [--rpc URL --journal PATH [--max-wait-ms MS]]`: prints
/// `LISTENING <port>`, serves on one thread until stdin closes.
fn serve(args: &[String]) -> Result<(), BoxError> {
    let scenario = args.first().ok_or("serve: which scenario?")?.clone();
    let value = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let redis_url = value("--redis");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let hello = get(|| async { "hello" });
            let app = match scenario.as_str() {
                "bare" => Router::new().route(PATH, hello),
                // A server as busy as a paid one without the layer: a handler that spins on
                // the CPU (no memory traffic), or that recovers one signature (libsecp256k1's
                // tables in the caches, as in verification).
                "bare-spin" => Router::new().route(
                    PATH,
                    get(|| async {
                        let t0 = Instant::now();
                        while t0.elapsed() < SPIN {
                            std::hint::spin_loop();
                        }
                        "hello"
                    }),
                ),
                "bare-recover" => recover_router(1),
                // A new signature every request, as a paid server sees them (libsecp256k1's
                // table walk then misses the caches as it does there), and none of the layer:
                // the honest floor under `paid-memory`.
                "bare-recover-fresh" => recover_router(FRESH_SIGNATURES),
                "challenge" | "paid-memory" => Router::new()
                    .route(PATH, hello)
                    .route_layer(layer(None, None)?),
                "bound" => Router::new().route(PATH, hello).route_layer(bound_layer()?),
                "paid-svm" => svm_router(hello)?,
                "paid-redis" => {
                    let url = redis_url.ok_or("paid-redis needs --redis URL")?;
                    let store = RedisNonceStore::connect(&url).await?;
                    Router::new()
                        .route(PATH, hello)
                        .route_layer(layer(Some(store), None)?)
                }
                "voucher-memory" | "voucher-redis" => voucher_router(&scenario, &value).await?,
                "paid-deferred" | "deferred-optimistic" => {
                    let settler = deferred_settler(&value, scenario == "paid-deferred").await?;
                    Router::new()
                        .route(PATH, hello)
                        .route_layer(layer(None, Some(settler))?)
                }
                other => return Err(format!("unknown scenario {other}").into()),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("LISTENING {}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            let stop = async {
                // The harness closes our stdin to stop us.
                let _ = tokio::task::spawn_blocking(|| {
                    let mut sink = String::new();
                    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
                })
                .await;
            };
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await?;
            Ok::<_, BoxError>(())
        })
}

/// A server child: killed (stdin closed, then kill) on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    name: String,
}

impl Server {
    fn spawn(name: &str, mut cmd: Command) -> Result<Self, BoxError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{name}: cannot start server: {e}"))?;
        let stdout = child.stdout.take().ok_or("piped stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(port) = line.trim().strip_prefix("LISTENING ") else {
            let _ = child.kill();
            return Err(format!("{name}: server did not start (said {line:?})").into());
        };
        Ok(Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port.parse()?)),
            name: name.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Server {
    /// Closes stdin and waits for the exit, however long it takes (valgrind writes its
    /// counts at exit, so it must not be killed).
    fn stop(mut self) -> Result<(), BoxError> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("{}: server exited with {status}", self.name).into());
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = writeln!(std::io::stderr(), "{}: killing server", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `taskset -c <core> <program>`, or the program alone when not pinning.
fn pinned(cfg: &Config, core: u32, program: &str) -> Command {
    if cfg.pin {
        let mut c = Command::new("taskset");
        c.args(["-c", &core.to_string(), program]);
        c
    } else {
        Command::new(program)
    }
}

fn our_server(cfg: &Config, scenario: &str, extra: &[&str]) -> Result<Server, BoxError> {
    let exe = std::env::current_exe()?;
    let mut cmd = pinned(cfg, 1, &exe.to_string_lossy());
    cmd.arg("serve").arg(scenario).args(extra);
    Server::spawn(scenario, cmd)
}

// ------------------------------------------------------------------------------------------------
// Payments (signed by the client before the run)

fn option() -> PaymentOption {
    PaymentOption::exact(&Asset::usdc_base_sepolia(), PRICE, PAY_TO).expect("valid option")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs with libsecp256k1 directly (faster than a generic signer): 65 bytes, v ∈ {27, 28},
/// low s (libsecp256k1 always normalizes).
struct FastSigner {
    key: SecretKey,
    from: Address,
    separator: B256,
    req: PaymentRequirements,
}

impl FastSigner {
    fn new(req: PaymentRequirements) -> Self {
        let hex = DEMO_PAYER_KEY.trim_start_matches("0x");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex key"))
            .collect();
        let key = SecretKey::from_byte_array(bytes.try_into().expect("32 bytes")).expect("key");
        let separator = domain_separator(
            req.extra_str("name").unwrap_or_default(),
            req.extra_str("version").unwrap_or_default(),
            req.network.chain_id(),
            req.asset.evm().unwrap_or_default(),
        );
        Self {
            key,
            from: demo_payer().address(),
            separator,
            req,
        }
    }

    /// A fresh payment valid from `now - 600` to `now + validity`.
    fn payload(&self, now: u64, validity: u64) -> ExactEvmPayload {
        let authorization = Authorization {
            from: self.from,
            to: self.req.pay_to.evm().unwrap_or_default(),
            value: self.req.amount,
            valid_after: U256::from(now.saturating_sub(600)),
            valid_before: U256::from(now + validity),
            nonce: random_nonce(),
        };
        let digest = signing_hash(self.separator, &authorization);
        let (recid, rs) = SECP256K1
            .sign_ecdsa_recoverable(Message::from_digest(digest.0), &self.key)
            .serialize_compact();
        let mut sig = rs.to_vec();
        sig.push(27 + i32::from(recid) as u8);
        ExactEvmPayload {
            signature: ABytes::from(sig),
            authorization,
        }
    }
}

/// Builds the header JSON for one payload (ours: `v2_json`; the peer: its own `accepted`).
type Wrap = dyn Fn(&ExactEvmPayload) -> Value + Send + Sync;

/// `n` unique payment headers, signed on every core (before any measurement).
fn sign_headers(req: &PaymentRequirements, n: usize, wrap: Arc<Wrap>) -> Vec<HeaderValue> {
    let t0 = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let now = unix_now();
    let per = n.div_ceil(threads);
    let out: Vec<HeaderValue> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let signer = FastSigner::new(req.clone());
                let wrap = wrap.clone();
                s.spawn(move || {
                    let count = per.min(n.saturating_sub(t * per));
                    (0..count)
                        .map(|_| encode(&wrap(&signer.payload(now, 300))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signer thread"))
            .collect()
    });
    eprintln!(
        "  signed {} payments in {:.1} s",
        out.len(),
        t0.elapsed().as_secs_f64()
    );
    out
}

/// What an official v2 client pays against: the first requirement of the server's 402 (its
/// `extra`, challenge id included, copied into `accepted`) and the 402's `resource`, echoed.
async fn fetch_challenge(
    addr: SocketAddr,
) -> Result<(PaymentRequirements, ResourceInfo), BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let req = Request::get(PATH)
        .header(
            http::header::HOST,
            HeaderValue::from_str(&addr.to_string())?,
        )
        .body(Empty::<Bytes>::new())?;
    let res = send.send_request(req).await?;
    if res.status() != StatusCode::PAYMENT_REQUIRED {
        return Err(format!("challenge: got {}", res.status()).into());
    }
    let value = res
        .headers()
        .get(PAYMENT_REQUIRED)
        .ok_or("challenge: no PAYMENT-REQUIRED header")?;
    let json = base64::engine::general_purpose::STANDARD.decode(value.as_bytes())?;
    let required: PaymentRequired = serde_json::from_slice(&json)?;
    drop(send);
    let _ = conn.await;
    let accepted = required
        .accepts
        .into_iter()
        .next()
        .ok_or("challenge: no accepts")?;
    Ok((accepted, required.resource))
}

/// `n` payment headers paying the challenge `server` sends, as an official client builds them.
async fn sign_for(server: SocketAddr, n: usize) -> Result<Vec<HeaderValue>, BoxError> {
    let (accepted, resource) = fetch_challenge(server).await?;
    let wrap: Arc<Wrap> = {
        let accepted = accepted.clone();
        Arc::new(move |p| v2_json(&accepted, p, Some(&resource)))
    };
    Ok(sign_headers(&accepted, n, wrap))
}

// ------------------------------------------------------------------------------------------------
// Load generator

/// Where each request's payment header comes from.
#[derive(Clone)]
enum Source {
    /// No payment header.
    None,
    /// Pre-signed headers, each used once: the next index and the end.
    Signed(Rc<Vec<HeaderValue>>, Rc<RefCell<usize>>, usize),
    /// The same header on every request (`kernel`'s padded bare requests).
    Fixed(HeaderValue),
    /// Headers signed while the run goes (the million-request run).
    Stream(Rc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<HeaderValue>>>),
    /// Cumulative vouchers per channel, sent in order: each connection takes the next unused
    /// channel (the shared counter) on its first request, then walks that channel's list
    /// (its own cursor: see [`Source::for_connection`]).
    Vouchers(
        Rc<Vec<Vec<HeaderValue>>>,
        Rc<RefCell<usize>>,
        Rc<RefCell<Option<(usize, usize)>>>,
    ),
}

impl Source {
    fn signed(headers: &Rc<Vec<HeaderValue>>) -> Self {
        Self::Signed(headers.clone(), Rc::new(RefCell::new(0)), headers.len())
    }

    fn vouchers(channels: Vec<Vec<HeaderValue>>) -> Self {
        Self::Vouchers(Rc::new(channels), Rc::default(), Rc::default())
    }

    /// The source of one new connection: a voucher source gets a cursor of its own.
    fn for_connection(&self) -> Self {
        match self {
            Self::Vouchers(all, next, _) => {
                Self::Vouchers(all.clone(), next.clone(), Rc::default())
            }
            other => other.clone(),
        }
    }

    /// Splits off the last quarter of the headers (for the one-connection phase), so the
    /// loaded phase cannot use them all up.
    fn split(&self) -> (Self, Self) {
        match self {
            Self::Signed(all, at, end) => {
                let start = *at.borrow();
                let cut = start + (end - start) * 3 / 4;
                (
                    Self::Signed(all.clone(), Rc::new(RefCell::new(start)), cut),
                    Self::Signed(all.clone(), Rc::new(RefCell::new(cut)), *end),
                )
            }
            other => (other.clone(), other.clone()),
        }
    }

    /// `Ok(None)`: send no header; `Err(())`: out of headers.
    async fn next(&self) -> Result<Option<HeaderValue>, ()> {
        match self {
            Self::None => Ok(None),
            Self::Signed(all, at, end) => {
                let mut i = at.borrow_mut();
                if *i >= *end {
                    return Err(());
                }
                let h = all.get(*i).cloned().ok_or(())?;
                *i += 1;
                Ok(Some(h))
            }
            Self::Fixed(h) => Ok(Some(h.clone())),
            Self::Stream(rx) => rx.lock().await.recv().await.map(Some).ok_or(()),
            Self::Vouchers(all, next, mine) => {
                let mut mine = mine.borrow_mut();
                let (channel, at) = mine.get_or_insert_with(|| {
                    let mut next = next.borrow_mut();
                    *next += 1;
                    (*next - 1, 0)
                });
                let h = all
                    .get(*channel)
                    .and_then(|v| v.get(*at))
                    .cloned()
                    .ok_or(())?;
                *at += 1;
                Ok(Some(h))
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Latencies (ns) of requests completed inside the measured window.
    lat: Vec<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    /// When the source ran dry (ends the window early).
    exhausted: Option<Instant>,
    /// Every completed request (the million run reports progress from it).
    done: u64,
    /// Every response with the expected status, warmup included.
    accepted: u64,
}

struct Stats {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Server CPU time over the window, as a fraction of one core.
    cpu: f64,
    /// Server CPU µs per request.
    cpu_us_per_req: f64,
    /// Of which in the kernel (stime).
    sys_us_per_req: f64,
    ok: u64,
    /// Responses with the expected status, warmup included (what the server sold).
    accepted: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Reads utime + stime of `pid` in seconds (USER_HZ is 100 on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// utime and stime of `pid` in seconds: user space, and the kernel on its behalf (socket
/// reads and writes, epoll; what callgrind does not count).
fn cpu_split(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Resident set size of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One connection's closed loop: request, whole response, next.
async fn connection(
    addr: SocketAddr,
    header: HeaderName,
    source: Source,
    expect: StatusCode,
    window: (Instant, Instant),
    shared: Rc<RefCell<Shared>>,
) -> Result<(), BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let host = HeaderValue::from_str(&addr.to_string())?;
    loop {
        if Instant::now() >= window.1 {
            return Ok(());
        }
        let value = match source.next().await {
            Ok(v) => v,
            Err(()) => {
                let mut s = shared.borrow_mut();
                s.exhausted.get_or_insert_with(Instant::now);
                return Ok(());
            }
        };
        let mut req = Request::get(PATH).header(http::header::HOST, host.clone());
        if let Some(v) = value {
            req = req.header(header.clone(), v);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        send.ready().await?;
        let t0 = Instant::now();
        let res = send.send_request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        let t1 = Instant::now();
        let mut s = shared.borrow_mut();
        s.done += 1;
        if status != expect {
            s.errors += 1;
            if s.first_error.is_none() {
                s.first_error = Some(format!(
                    "got {status}, expected {expect}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ));
            }
        } else {
            s.accepted += 1;
        }
        if status == expect && t1 >= window.0 && t1 < window.1 {
            s.ok += 1;
            s.lat.push((t1 - t0).as_nanos() as u64);
        }
    }
}

/// Drives `conns` connections for warmup + measure; stats over the measured window.
async fn run_load(
    server: &Server,
    header: HeaderName,
    source: Source,
    expect: StatusCode,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Stats, BoxError> {
    let (server_pid, addr) = (server.pid(), server.addr);
    let start = Instant::now() + Duration::from_millis(20);
    let window = (start + warmup, start + warmup + measure);
    let shared = Rc::new(RefCell::new(Shared::default()));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::task::spawn_local(connection(
                addr,
                header.clone(),
                source.for_connection(),
                expect,
                window,
                shared.clone(),
            ))
        })
        .collect();
    tokio::time::sleep_until(window.0.into()).await;
    let (user0, sys0) = cpu_split(server_pid);
    let cpu0 = user0 + sys0;
    let t0 = Instant::now();
    // The window closes at its end, or when the pre-signed headers run out.
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if Instant::now() >= window.1 || shared.borrow().exhausted.is_some() {
            break;
        }
    }
    let (user1, sys1) = cpu_split(server_pid);
    let cpu1 = user1 + sys1;
    let end = shared
        .borrow()
        .exhausted
        .unwrap_or(window.1)
        .min(Instant::now());
    let elapsed = end.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    for t in tasks {
        t.await??;
    }
    let mut s = std::mem::take(&mut *shared.borrow_mut());
    s.lat.sort_unstable();
    let n = s.lat.len() as f64;
    Ok(Stats {
        rps: n / elapsed,
        p50_us: percentile(&s.lat, 0.50),
        p99_us: percentile(&s.lat, 0.99),
        cpu: (cpu1 - cpu0) / elapsed,
        sys_us_per_req: if n > 0.0 {
            (sys1 - sys0) * 1e6 / n
        } else {
            f64::NAN
        },
        cpu_us_per_req: if n > 0.0 {
            (cpu1 - cpu0) * 1e6 / n
        } else {
            f64::NAN
        },
        ok: s.ok,
        accepted: s.accepted,
        errors: s.errors,
        first_error: s.first_error,
    })
}

// ------------------------------------------------------------------------------------------------
// The run

struct Row {
    name: String,
    loaded: Option<Stats>,
    single: Option<Stats>,
    rss: f64,
    note: String,
    /// A check after the load failed (the deferred drain).
    failed: bool,
}

impl Row {
    fn skipped(name: &str, note: &str) -> Self {
        Self {
            name: name.into(),
            loaded: None,
            single: None,
            rss: f64::NAN,
            note: note.into(),
            failed: false,
        }
    }
}

/// Runs one scenario: loaded throughput, then one connection alone for latency.
async fn measure(
    cfg: &Config,
    name: &str,
    server: &Server,
    header: HeaderName,
    source: Source,
    expect: StatusCode,
) -> Result<Row, BoxError> {
    let (source, alone) = source.split();
    let loaded = run_load(
        server,
        header.clone(),
        source,
        expect,
        cfg.conns,
        cfg.warmup,
        cfg.measure,
    )
    .await?;
    let single = run_load(
        server,
        header,
        alone,
        expect,
        1,
        cfg.warmup / 4,
        cfg.latency,
    )
    .await?;
    let rss = rss_mib(server.pid());
    eprintln!(
        "  {name}: {:.0} req/s, p50 {:.0} µs (1 conn: {:.0} µs), server CPU {:.0} % = {:.1} µs/req ({:.1} in the kernel)",
        loaded.rps,
        loaded.p50_us,
        single.p50_us,
        loaded.cpu * 100.0,
        loaded.cpu_us_per_req,
        loaded.sys_us_per_req
    );
    Ok(Row {
        name: name.into(),
        loaded: Some(loaded),
        single: Some(single),
        rss,
        note: String::new(),
        failed: false,
    })
}

/// `load recover --secs S`: libsecp256k1 recoveries (with the address keccak, as in verify)
/// in a loop over pre-made digests and signatures; prints `RECOVER <ops/s>`.
fn recover_loop(args: &[String]) -> Result<(), BoxError> {
    let signer = FastSigner::new(option().requirements().clone());
    let now = unix_now();
    let made: Vec<(B256, ABytes)> = (0..256)
        .map(|_| {
            let p = signer.payload(now, 300);
            (
                signing_hash(signer.separator, &p.authorization),
                p.signature,
            )
        })
        .collect();
    rate_loop(args, "RECOVER", || {
        for (digest, sig) in &made {
            let who = recover_signer(*digest, sig).map_err(|e| format!("recover: {e}"))?;
            if who != signer.from {
                return Err("recovered the wrong signer".into());
            }
        }
        Ok(made.len() as u64)
    })
}

/// Runs `batch` (returning how many operations it made) until `--secs` (default 2) are over;
/// prints `<tag> <ops per wall second> <ops per CPU second>`.
fn rate_loop(
    args: &[String],
    tag: &str,
    mut batch: impl FnMut() -> Result<u64, BoxError>,
) -> Result<(), BoxError> {
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(2.0), |v| v.parse())?;
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while t0.elapsed() < deadline {
        n += batch()?;
    }
    let cpu = cpu_secs(std::process::id()).max(1e-9);
    // Wall rate and the rate per CPU second (what the core gave us, neighbours aside).
    println!(
        "{tag} {:.1} {:.1}",
        n as f64 / t0.elapsed().as_secs_f64(),
        n as f64 / cpu
    );
    Ok(())
}

/// Recoveries per wall second and per CPU second of one core.
fn recovery_limit(cfg: &Config) -> Result<(f64, f64), BoxError> {
    loop_limit(cfg, "recover", "RECOVER")
}

/// `load <command>` on the server's core for `--recover` seconds: its `<tag>` rates.
fn loop_limit(cfg: &Config, command: &str, tag: &str) -> Result<(f64, f64), BoxError> {
    let exe = std::env::current_exe()?;
    let out = pinned(cfg, 1, &exe.to_string_lossy())
        .args([command, "--secs", &cfg.recover.as_secs_f64().to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
        .ok_or_else(|| format!("{command} loop failed: {text}"))?;
    let mut rates = line.split_whitespace().map(str::parse::<f64>);
    match (rates.next(), rates.next()) {
        (Some(Ok(wall)), Some(Ok(cpu))) => Ok((wall, cpu)),
        _ => Err(format!("{command} loop said {line:?}").into()),
    }
}

/// A `redis-server` on a free loopback port (pinned to the load generator's core), killed on
/// drop; `None` when it is not installed (an error under CI=true).
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(cfg: &Config) -> Result<Option<Self>, BoxError> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                return Err("redis-server not installed (CI=true: scripts/install-test-deps.sh installs it)".into());
            }
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = pinned(cfg, 0, "redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.write_all(b"PING\r\n")?;
                let mut buf = [0u8; 7];
                std::io::Read::read_exact(&mut s, &mut buf)?;
                Ok(&buf == b"+PONG\r\n")
            });
            if pong.is_ok_and(|p| p) {
                return Ok(Some(redis));
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server did not answer on port {port}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer's 402 challenge: its `accepts[0]` and `resource`, verbatim.
async fn peer_challenge(addr: SocketAddr) -> Result<(Value, Value), BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let req = Request::get(PATH)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let res = send.send_request(req).await?;
    if res.status() != StatusCode::PAYMENT_REQUIRED {
        return Err(format!("peer answered {} without payment", res.status()).into());
    }
    let header = res
        .headers()
        .get("payment-required")
        .ok_or("peer 402 has no PAYMENT-REQUIRED header")?;
    let doc: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD.decode(header.as_bytes())?,
    )?;
    Ok((doc["accepts"][0].clone(), doc["resource"].clone()))
}

async fn drive(cfg: Config) -> Result<(), BoxError> {
    let t_run = Instant::now();
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "load harness: {} mode, {} connections, {} s warmup + {} s measured, pinning {}",
        if cfg.smoke {
            "SMOKE (checks only: numbers from a debug build mean nothing)"
        } else {
            "full"
        },
        cfg.conns,
        cfg.warmup.as_secs_f64(),
        cfg.measure.as_secs_f64(),
        if cfg.pin {
            "server core 1, load core 0"
        } else {
            "off"
        }
    );
    let req = option().requirements().clone();
    let ours: Arc<Wrap> = {
        let req = req.clone();
        Arc::new(move |p| v2_json(&req, p, None))
    };
    let headers = Rc::new(sign_headers(&req, cfg.headers, ours.clone()));
    let mut rows = Vec::new();

    let recover = recovery_limit(&cfg)?;
    eprintln!(
        "  recovery limit: {:.0} /s wall, {:.0} per CPU second",
        recover.0, recover.1
    );

    for (name, source, expect) in [
        ("bare", Source::None, StatusCode::OK),
        ("challenge", Source::None, StatusCode::PAYMENT_REQUIRED),
        ("paid-memory", Source::signed(&headers), StatusCode::OK),
    ] {
        let server = our_server(&cfg, name, &[])?;
        rows.push(measure(&cfg, name, &server, PAYMENT_SIGNATURE, source, expect).await?);
    }
    // Bound challenges: payments signed against the server's own 402, as official clients do.
    let server = our_server(&cfg, "bound", &[])?;
    let bound = Source::signed(&Rc::new(sign_for(server.addr, cfg.headers).await?));
    rows.push(
        measure(
            &cfg,
            "bound",
            &server,
            PAYMENT_SIGNATURE,
            bound,
            StatusCode::OK,
        )
        .await?,
    );
    drop(server);
    rows.push(svm_row(&cfg).await?);

    match Redis::start(&cfg)? {
        Some(redis) => {
            let server = our_server(&cfg, "paid-redis", &["--redis", &redis.url()])?;
            rows.push(
                measure(
                    &cfg,
                    "paid-redis",
                    &server,
                    PAYMENT_SIGNATURE,
                    Source::signed(&headers),
                    StatusCode::OK,
                )
                .await?,
            );
        }
        None => rows.push(Row::skipped(
            "paid-redis",
            "SKIPPED: redis-server not installed",
        )),
    }
    rows.extend(voucher_rows(&cfg).await?);

    // Deferred settlement on a fresh anvil each, with payments signed for it (the run's first
    // batch would have expired by the last rows: a proof is valid for 300 s). The smoke run
    // keeps the seller's configuration only (pre-check on).
    let sign = || Rc::new(sign_headers(&req, cfg.headers / 4, ours.clone()));
    let disk = std::env::temp_dir();
    rows.push(deferred_row(&cfg, "paid-deferred", "paid-deferred", &disk, &sign()).await?);
    if !cfg.smoke {
        rows.push(
            deferred_row(
                &cfg,
                "deferred-optimistic",
                "deferred-optimistic",
                &disk,
                &sign(),
            )
            .await?,
        );
        // The journal on tmpfs: fdatasync costs nothing there, so these rows show what the
        // settler itself adds (pre-check RPC, journal code), as on a disk with fast syncs.
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            rows.push(deferred_row(&cfg, "deferred tmpfs", "paid-deferred", shm, &sign()).await?);
            rows.push(
                deferred_row(
                    &cfg,
                    "deferred-opt tmpfs",
                    "deferred-optimistic",
                    shm,
                    &sign(),
                )
                .await?,
            );
        }
    }

    match &cfg.peer {
        None => rows.push(Row::skipped(
            "peer x402-axum",
            if cfg.smoke {
                "not run in smoke mode"
            } else {
                "not run (no --peer binary)"
            },
        )),
        Some(bin) => match chain::Chain::start("load harness").await {
            None => rows.push(Row::skipped(
                "peer x402-axum",
                "SKIPPED: anvil not installed",
            )),
            Some(chain) => {
                // x402-chain-eip155 refuses to start unless the EIP-6492 validator, Permit2
                // and its x402 Permit2 proxy have code. Verifying an EOA's EIP-3009 payment
                // calls none of them (only the token: balanceOf, transferWithAuthorization
                // simulated), so a one-byte STOP stands in for each on the local chain.
                for contract in [
                    "0xdAcD51A54883eb67D95FAEb2BBfdC4a9a6BD2a3B",
                    "0x000000000022D473030F116dDEE9F6B43aC78BA3",
                    "0x402085c248EeA27D92E8b30b2C58ed07f9E20001",
                ] {
                    let _: Value = chain
                        .provider()
                        .raw_request("anvil_setCode".into(), (contract, "0x00"))
                        .await?;
                }
                let mut cmd = pinned(&cfg, 1, bin);
                cmd.args(["--rpc", chain.url()]);
                let server = Server::spawn("peer", cmd)?;
                let (accepted, resource) = peer_challenge(server.addr).await?;
                let peer_req: PaymentRequirements = serde_json::from_value(accepted.clone())?;
                let wrap: Arc<Wrap> = Arc::new(move |p| {
                    json!({
                        "x402Version": 2,
                        "accepted": accepted,
                        "resource": resource,
                        "payload": p,
                    })
                });
                let peer_headers = Rc::new(sign_headers(&peer_req, cfg.headers / 4, wrap));
                let mut row = measure(
                    &cfg,
                    "peer x402-axum",
                    &server,
                    PAYMENT_SIGNATURE,
                    Source::signed(&peer_headers),
                    StatusCode::OK,
                )
                .await?;
                row.note =
                    "verify via in-process facilitator + anvil (core 0); no-op settle".into();
                rows.push(row);
                drop(server);
                drop(chain);
            }
        },
    }

    let million = if cfg.million {
        Some(million_run(&cfg).await?)
    } else {
        None
    };

    let failed = report(&cfg, &rows, recover, million.as_ref());
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nloadavg before: {}  after: {}  (2 cores; other processes on the machine share them)",
        load0.trim(),
        load1.trim()
    );
    println!("total run time {:.0} s", t_run.elapsed().as_secs_f64());
    if failed {
        return Err("some requests got an unexpected status (see above)".into());
    }
    Ok(())
}

/// One deferred scenario on a fresh anvil (inheriting the harness's core 0): the load, then
/// the drain: the payee's on-chain balance must reach exactly one price per 200 served, so
/// every answered request is shown to have settled.
async fn deferred_row(
    cfg: &Config,
    name: &str,
    scenario: &str,
    journal_dir: &std::path::Path,
    headers: &Rc<Vec<HeaderValue>>,
) -> Result<Row, BoxError> {
    let Some(chain) = chain::Chain::start("load harness").await else {
        return Ok(Row::skipped(name, "SKIPPED: anvil not installed"));
    };
    let dir = journal_dir.join(format!("tower-x402-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let journal = dir.join(format!("{scenario}.journal"));
    let _ = std::fs::remove_file(&journal);
    let journal_arg = journal.to_string_lossy().into_owned();
    let mut extra = vec!["--rpc", chain.url(), "--journal", &journal_arg];
    if cfg.smoke {
        // Drain in a moment instead of the default 2 s batch wait.
        extra.extend(["--max-wait-ms", "100"]);
    }
    let server = our_server(cfg, scenario, &extra)?;
    let mut row = measure(
        cfg,
        name,
        &server,
        PAYMENT_SIGNATURE,
        Source::signed(headers),
        StatusCode::OK,
    )
    .await?;
    let sold: u64 = [&row.loaded, &row.single]
        .into_iter()
        .flatten()
        .map(|s| s.accepted)
        .sum();
    let want = option().requirements().amount * U256::from(sold);
    let t0 = Instant::now();
    // Under the proofs' 300 s validity: what is not settled by then never will be.
    let limit = Duration::from_secs(if cfg.smoke { 30 } else { 280 });
    let settled = loop {
        let got = chain.balance(PAY_TO).await;
        if got >= want || t0.elapsed() > limit {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain = t0.elapsed().as_secs_f64();
    drop(server);
    drop(chain);
    let _ = std::fs::remove_file(&journal);
    let _ = std::fs::remove_dir(&dir);
    if settled == want {
        row.note = format!("{sold} sold, all settled on-chain {drain:.1} s after the load");
    } else {
        row.note = format!(
            "FAILED: {sold} sold but the payee received {settled} units, not {want}, {drain:.0} s after the load"
        );
        row.failed = true;
    }
    eprintln!("    {name}: {}", row.note);
    Ok(row)
}

/// `load kernel [--conns N] [--measure S] [--headers N] [--perf] [--record DIR] [scenario...]`:
/// where a request's kernel time goes (issue #17 item 8). Each scenario's server runs pinned to
/// core 1 under N connections from this process on core 0, and the row gives, per request: the
/// server's user and kernel CPU (µs), its voluntary and involuntary context switches, and this
/// load generator's own CPU. Scenarios (default: all, in this order):
///
/// * `bare`: the HTTP baseline;
/// * `bare-big`: the same with a 1.3 KiB `x-pad` header, as large as a paid request's proof;
/// * `bare-spin`: a handler that spins 40 µs on the CPU, as busy as a paid server but without
///   its memory traffic;
/// * `bare-recover`: a handler that recovers one signature (libsecp256k1's tables in the
///   caches, as in verification), without the layer;
/// * `bare-recover-fresh`: the same with a signature it has not recovered before on every
///   request (100,000 signed at start), as a paid server sees them: the floor under `paid-memory`;
/// * `paid-memory`: the paid route, memory store, verify-only;
/// * `bound`: the same with bound challenges (`bind_challenges`): each payment echoes the
///   challenge id and `resource` of a 402 fetched from the server at start, as official
///   clients do, and the layer checks the id's HMAC (not run by default).
/// * `voucher-memory`: paid by `batch-settlement` vouchers, memory channel store, one channel
///   per connection (not run by default).
///
/// `--perf` adds `perf stat` counts per request: the server's system calls, the wake-ups it
/// issues (`sched:sched_waking`, mostly of the load generator's thread) and context switches,
/// and the IPIs core 0 receives (function-call and reschedule vectors, whole core, so
/// neighbours add some). `--record DIR` samples the server (`perf record -g`, cpu-clock) into
/// `DIR/<scenario>.data`.
async fn kernel(args: &[String]) -> Result<(), BoxError> {
    let cfg = Config::from_args(args)?;
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let perf = args.iter().any(|a| a == "--perf");
    let record = value("--record").map(std::path::PathBuf::from);
    let mut scenarios: Vec<&str> = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--perf" || a == "--no-pin" {
        } else if a.starts_with("--") {
            skip = true;
        } else {
            scenarios.push(a);
        }
    }
    if scenarios.is_empty() {
        scenarios = vec![
            "bare",
            "bare-big",
            "bare-spin",
            "bare-recover",
            "bare-recover-fresh",
            "paid-memory",
            "bound",
        ];
    }
    let req = option().requirements().clone();
    let ours: Arc<Wrap> = {
        let req = req.clone();
        Arc::new(move |p| v2_json(&req, p, None))
    };
    let headers = Rc::new(sign_headers(&req, cfg.headers, ours));
    let pad = HeaderValue::from_str(&"p".repeat(1300))?;
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let recover = recovery_limit(&cfg)?;
    println!(
        "KERNEL conns {} measure {} s; recovery {:.1} µs CPU; load {}",
        cfg.conns,
        cfg.measure.as_secs_f64(),
        1e6 / recover.1,
        load0.trim()
    );
    println!(
        "{:<13} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}{}",
        "scenario",
        "req/s",
        "user",
        "kernel",
        "vol cs",
        "inv cs",
        "cli cpu",
        "srv %",
        if perf {
            "  syscalls waking  srv cs  faults  IPI(c0)"
        } else {
            ""
        }
    );
    for scenario in scenarios {
        let (serve_as, header, source, expect) = match scenario {
            "bare" | "bare-spin" | "bare-recover" | "bare-recover-fresh" => {
                (scenario, PAYMENT_SIGNATURE, Source::None, StatusCode::OK)
            }
            "bare-big" => (
                "bare",
                HeaderName::from_static("x-pad"),
                Source::Fixed(pad.clone()),
                StatusCode::OK,
            ),
            "paid-memory" => (
                scenario,
                PAYMENT_SIGNATURE,
                Source::signed(&headers),
                StatusCode::OK,
            ),
            // Signed below, against the server's own challenge.
            "bound" => (scenario, PAYMENT_SIGNATURE, Source::None, StatusCode::OK),
            // Vouchers on one channel per connection, signed below.
            "voucher-memory" => (scenario, PAYMENT_SIGNATURE, Source::None, StatusCode::OK),
            other => return Err(format!("kernel: no scenario {other}").into()),
        };
        let channels = cfg.conns.to_string();
        let extra: &[&str] = match scenario {
            "voucher-memory" => &["--channels", &channels],
            _ => &[],
        };
        let server = our_server(&cfg, serve_as, extra)?;
        let source = match scenario {
            "bound" => Source::signed(&Rc::new(sign_for(server.addr, cfg.headers).await?)),
            "voucher-memory" => Source::vouchers(sign_vouchers(&vec![
                (cfg.headers / cfg.conns)
                    .max(1);
                cfg.conns
            ])),
            _ => source,
        };
        let pid = server.pid();
        let window = Duration::from_millis(20) + cfg.warmup + cfg.measure;
        let secs = format!("{:.2}", window.as_secs_f64());
        let stat = if perf {
            let task = Command::new("perf")
                .args(["stat", "-x,", "-p", &pid.to_string(), "-e"])
                .arg("raw_syscalls:sys_enter,sched:sched_waking,context-switches,page-faults")
                .args(["--", "sleep", &secs])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let core0 = Command::new("perf")
                .args(["stat", "-x,", "-a", "-A", "-C", "0", "-e"])
                .arg("irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry")
                .args(["--", "sleep", &secs])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            Some((task, core0))
        } else {
            None
        };
        let sampler = match &record {
            Some(dir) => Some(
                Command::new("perf")
                    .args(["record", "-q", "-F", "2000", "-e", "cpu-clock", "-g", "-p"])
                    .arg(pid.to_string())
                    .arg("-o")
                    .arg(dir.join(format!("{scenario}.data")))
                    .args(["--", "sleep", &secs])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ),
            None => None,
        };
        let cs0 = ctx_switches(pid);
        let me0 = cpu_secs(std::process::id());
        let t0 = Instant::now();
        let s = run_load(
            &server,
            header,
            source,
            expect,
            cfg.conns,
            cfg.warmup,
            cfg.measure,
        )
        .await?;
        let wall = t0.elapsed().as_secs_f64();
        let me1 = cpu_secs(std::process::id());
        let cs1 = ctx_switches(pid);
        let n = s.accepted.max(1) as f64;
        let mut counts = String::new();
        if let Some((task, core0)) = stat {
            let read = |c: Child| -> Result<Vec<f64>, BoxError> {
                let out = c.wait_with_output()?;
                Ok(String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split(',').collect();
                        // With -A the first field is the CPU.
                        let v = if f.first().is_some_and(|c| c.starts_with("CPU")) {
                            f.get(1)
                        } else {
                            f.first()
                        };
                        v?.parse::<f64>().ok()
                    })
                    .collect())
            };
            let t = read(task)?;
            let c = read(core0)?;
            let per = |v: Option<&f64>| v.map_or(f64::NAN, |v| v / n);
            counts = format!(
                "  {:>8.2} {:>6.2} {:>7.2} {:>7.3} {:>8.2}",
                per(t.first()),
                per(t.get(1)),
                per(t.get(2)),
                per(t.get(3)),
                c.iter().sum::<f64>() / n
            );
        }
        if let Some(mut sampler) = sampler {
            sampler.wait()?;
        }
        if s.errors > 0 {
            return Err(
                format!("{scenario}: {} errors, first {:?}", s.errors, s.first_error).into(),
            );
        }
        // Context switches and the generator's CPU cover the whole load (warmup included),
        // like `accepted`; the server's CPU covers the measured window, like `ok`.
        println!(
            "{:<13} {:>8.0} {:>7.2} {:>7.2} {:>7.3} {:>7.3} {:>7.2} {:>7.0}{}",
            scenario,
            s.rps,
            s.cpu_us_per_req - s.sys_us_per_req,
            s.sys_us_per_req,
            (cs1.0 - cs0.0) as f64 / n,
            (cs1.1 - cs0.1) as f64 / n,
            (me1 - me0) * 1e6 / n,
            s.cpu * 100.0,
            counts
        );
        let _ = wall;
        drop(server);
    }
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("KERNEL load at the end {}", load1.trim());
    Ok(())
}

/// Voluntary and involuntary context switches of `pid` (all its threads' sum is not in
/// /proc/<pid>/status: the server runs on one tokio thread, its main thread).
fn ctx_switches(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// `load challenge-check [N]`: the native cost of checking one bound challenge id (what the
/// `bound` scenario adds to a paid request), timed over N checks (default 200,000). Under
/// callgrind SHA-256 runs its portable code (valgrind hides SHA-NI from the CPU id), so the
/// instruction count of `bound` overstates what this check costs on hardware that has it.
fn challenge_check(args: &[String]) -> Result<(), BoxError> {
    use tower_x402::challenge::Binding;
    let n: u32 = args.first().map_or(Ok(200_000), |v| v.parse())?;
    let keys = ChallengeKeys::new(BENCH_CHALLENGE_KEY).with_ttl(Duration::from_secs(3600));
    let req = option().requirements().clone();
    let binding = Binding {
        url: "http://127.0.0.1:8080/weather",
        method: "GET",
        requirements: &req,
    };
    let id = keys.issue(&binding);
    let t0 = Instant::now();
    let mut ok = 0u32;
    for _ in 0..n {
        ok += u32::from(keys.check(std::hint::black_box(&id), &binding).is_ok());
    }
    let per = t0.elapsed().as_secs_f64() * 1e9 / f64::from(n);
    if ok != n {
        return Err(format!("challenge-check: {} of {n} checks failed", n - ok).into());
    }
    println!("CHALLENGE-CHECK {per:.0} ns per check ({n} checks)");
    Ok(())
}

/// `load http-count [--n1 N] [--n2 N] [--out DIR] [scenario...]`: the whole HTTP request
/// (hyper + axum + the layer, server side) counted by callgrind. Each scenario's server runs
/// under `valgrind --tool=callgrind` twice, serving n1 and then n2 requests sent one after the
/// other on one keep-alive connection; (Ir(n2) − Ir(n1)) / (n2 − n1) is one request's
/// user-space instructions, process start and shutdown cancelled out. System calls (socket
/// reads and writes, epoll) run in the kernel and are not counted: they are the part of the
/// server's CPU time per request that this count leaves out. Prints `IR <scenario> <per req>`.
/// Scenarios: `bare`, `challenge`, `paid-memory`, `bound` (as in `kernel`; its server
/// answers one 402 first in both runs, so that cancels too), `voucher-memory` (one
/// channel's cumulative vouchers, memory channel store, no chain) and `voucher-32` (the same
/// on 32 channels taken in turn: each run opens all 32, so that cancels).
async fn http_count(args: &[String]) -> Result<(), BoxError> {
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let n1: usize = value("--n1").map_or(Ok(200), |v| v.parse())?;
    let n2: usize = value("--n2").map_or(Ok(1200), |v| v.parse())?;
    let out = std::path::PathBuf::from(value("--out").map_or("target/callgrind", |v| v));
    std::fs::create_dir_all(&out)?;
    let mut scenarios: Vec<&str> = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a.starts_with("--") {
            skip = true;
        } else {
            scenarios.push(a);
        }
    }
    if scenarios.is_empty() {
        scenarios = vec![
            "bare",
            "challenge",
            "paid-memory",
            "bound",
            "voucher-memory",
        ];
    }
    let req = option().requirements().clone();
    let ours: Arc<Wrap> = {
        let req = req.clone();
        Arc::new(move |p| v2_json(&req, p, None))
    };
    let signed = sign_headers(&req, n2, ours);
    // One channel's cumulative vouchers: requests one after the other on one connection.
    let vouchers = match scenarios.contains(&"voucher-memory") {
        true => sign_vouchers(&[n2]).pop().unwrap_or_default(),
        false => Vec::new(),
    };
    // 32 channels' vouchers, taken in turn (a server paid on many channels at once).
    let many = match scenarios.contains(&"voucher-32") {
        true => {
            let channels = sign_vouchers(&[n2.div_ceil(32); 32]);
            (0..n2.div_ceil(32))
                .flat_map(|k| channels.iter().map(move |c| c[k].clone()))
                .take(n2)
                .collect()
        }
        false => Vec::new(),
    };
    let exe = std::env::current_exe()?;
    for scenario in scenarios {
        let (headers, expect) = match scenario {
            "bare" => (None, StatusCode::OK),
            "challenge" => (None, StatusCode::PAYMENT_REQUIRED),
            "paid-memory" => (Some(&signed[..]), StatusCode::OK),
            "bound" => (None, StatusCode::OK),
            "voucher-memory" => (Some(&vouchers[..]), StatusCode::OK),
            "voucher-32" => (Some(&many[..]), StatusCode::OK),
            other => return Err(format!("http-count: no scenario {other}").into()),
        };
        let mut ir = Vec::new();
        for n in [n1, n2] {
            let file = out.join(format!("http-{scenario}.{n}.out"));
            let log = out.join(format!("http-{scenario}.{n}.log"));
            let mut cmd = Command::new("valgrind");
            cmd.arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", file.display()))
                .arg(format!("--log-file={}", log.display()))
                .arg(&exe);
            match scenario {
                "voucher-32" => cmd.args(["serve", "voucher-memory", "--channels", "32"]),
                _ => cmd.args(["serve", scenario]),
            };
            let server = Server::spawn(scenario, cmd)?;
            // bound: one 402 first (in both runs, so it cancels), then payments against it.
            let own = match scenario {
                "bound" => Some(sign_for(server.addr, n).await?),
                _ => None,
            };
            sequential(server.addr, own.as_deref().or(headers), n, expect).await?;
            server.stop()?;
            let text = std::fs::read_to_string(&log)?;
            let count = text
                .lines()
                .find_map(|l| l.split_once("Collected : ").map(|(_, r)| r.trim()))
                .ok_or_else(|| format!("no callgrind total in {}", log.display()))?
                .parse::<u64>()?;
            ir.push(count);
        }
        let per = (ir[1] as f64 - ir[0] as f64) / (n2 - n1) as f64;
        println!(
            "IR {scenario} {per:.0}   (Ir {} at n={n1}, {} at n={n2})",
            ir[0], ir[1]
        );
    }
    Ok(())
}

/// `n` requests one after the other on one connection; each must answer `expect`.
async fn sequential(
    addr: SocketAddr,
    headers: Option<&[HeaderValue]>,
    n: usize,
    expect: StatusCode,
) -> Result<(), BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let host = HeaderValue::from_str(&addr.to_string())?;
    for i in 0..n {
        let mut req = Request::get(PATH).header(http::header::HOST, host.clone());
        if let Some(h) = headers {
            req = req.header(
                PAYMENT_SIGNATURE,
                h.get(i).ok_or("too few payments")?.clone(),
            );
        }
        send.ready().await?;
        let res = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
        let status = res.status();
        res.into_body().collect().await?;
        if status != expect {
            return Err(format!("request {i}: got {status}, expected {expect}").into());
        }
    }
    drop(send);
    let _ = conn.await;
    Ok(())
}

struct Million {
    requests: u64,
    secs: f64,
    checkpoints: Vec<(u64, f64)>,
    errors: u64,
    first_error: Option<String>,
}

/// One million distinct paid requests, signed while the run goes (on core 0) with 10 s
/// validity so the memory store's entries expire and are swept; RSS sampled along the way.
async fn million_run(cfg: &Config) -> Result<Million, BoxError> {
    const TOTAL: u64 = 1_000_000;
    const VALIDITY: u64 = 10;
    eprintln!("  1M distinct paid requests (memory store, {VALIDITY} s validity) ...");
    let server = our_server(cfg, "paid-memory", &[])?;
    let rss_start = rss_mib(server.pid());
    let (tx, rx) = tokio::sync::mpsc::channel::<HeaderValue>(2048);
    let req = option().requirements().clone();
    let signer = std::thread::spawn(move || {
        let signer = FastSigner::new(req.clone());
        for _ in 0..TOTAL {
            let h = encode(&v2_json(&req, &signer.payload(unix_now(), VALIDITY), None));
            if tx.blocking_send(h).is_err() {
                return;
            }
        }
    });
    let shared_source = Source::Stream(Rc::new(tokio::sync::Mutex::new(rx)));
    let shared = Rc::new(RefCell::new(Shared::default()));
    let far = Instant::now() + Duration::from_secs(3600);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..cfg.conns)
        .map(|_| {
            tokio::task::spawn_local(connection(
                server.addr,
                PAYMENT_SIGNATURE,
                shared_source.clone(),
                StatusCode::OK,
                // Latencies are not kept here: the window is empty.
                (far, far),
                shared.clone(),
            ))
        })
        .collect();
    let mut checkpoints = vec![(0, rss_start)];
    let mut next = 100_000;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (done, exhausted) = {
            let s = shared.borrow();
            (s.done, s.exhausted.is_some())
        };
        if done >= next {
            let rss = rss_mib(server.pid());
            eprintln!("    {done} requests: RSS {rss:.1} MiB");
            checkpoints.push((done, rss));
            next += 100_000;
        }
        if exhausted {
            break;
        }
    }
    for t in tasks {
        t.await??;
    }
    let _ = signer.join();
    let secs = t0.elapsed().as_secs_f64();
    let s = shared.borrow();
    checkpoints.push((s.done, rss_mib(server.pid())));
    Ok(Million {
        requests: s.done,
        secs,
        checkpoints,
        errors: s.errors,
        first_error: s.first_error.clone(),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// Prints the table and the ratios; true when a request got an unexpected status.
fn report(cfg: &Config, rows: &[Row], recover: (f64, f64), million: Option<&Million>) -> bool {
    let (recover, recover_cpu) = recover;
    let mut failed = false;
    println!(
        "\n{:<19} {:>9} {:>9} {:>9} {:>7} {:>9} {:>8} | {:>10} {:>10} | {:>7}",
        "scenario",
        "req/s",
        "p50 µs",
        "p99 µs",
        "srv CPU",
        "CPU µs/rq",
        "RSS MiB",
        "1conn p50",
        "1conn p99",
        "errors"
    );
    for r in rows {
        match (&r.loaded, &r.single) {
            (Some(l), Some(s)) => {
                println!(
                    "{:<19} {:>9.0} {:>9.0} {:>9.0} {:>6.0}% {:>9.1} {:>8.1} | {:>10.0} {:>10.0} | {:>7}{}",
                    r.name,
                    l.rps,
                    l.p50_us,
                    l.p99_us,
                    l.cpu * 100.0,
                    l.cpu_us_per_req,
                    r.rss,
                    s.p50_us,
                    s.p99_us,
                    l.errors + s.errors,
                    if r.note.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", r.note)
                    }
                );
                for e in [&l.first_error, &s.first_error].into_iter().flatten() {
                    println!("    first error: {e}");
                }
                if l.errors + s.errors > 0 || l.ok == 0 || s.ok == 0 {
                    println!(
                        "    FAILED: {} errors, {} + {} ok",
                        l.errors + s.errors,
                        l.ok,
                        s.ok
                    );
                    failed = true;
                }
            }
            _ => println!("{:<19} {}", r.name, r.note),
        }
        failed |= r.failed;
    }
    println!(
        "{:<19} {:>9.0}   ({:.0} per CPU second = {:.1} µs; libsecp256k1 recover + address keccak)",
        "recovery limit",
        recover,
        recover_cpu,
        1e6 / recover_cpu
    );

    let get = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.loaded.as_ref())
    };
    let single = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.single.as_ref())
    };
    println!("\nratios (same run, same cores):");
    if let Some(paid) = get("paid-memory") {
        let r = paid.rps / recover;
        println!(
            "  paid(memory) / recovery limit      = {r:.2}   (target ≥ 0.80: {})",
            verdict(r >= 0.8)
        );
        // Robust to neighbours: the server's CPU per request against one recovery's CPU.
        let r_cpu = (1e6 / recover_cpu) / paid.cpu_us_per_req;
        println!(
            "    by CPU time per request          = {r_cpu:.2}   ({:.1} µs/req vs {:.1} µs/recovery; target ≥ 0.80: {})",
            paid.cpu_us_per_req,
            1e6 / recover_cpu,
            verdict(r_cpu >= 0.8)
        );
        let user = paid.cpu_us_per_req - paid.sys_us_per_req;
        println!(
            "    by user-space CPU only           = {:.2}   ({user:.1} µs/req user + {:.1} kernel)",
            (1e6 / recover_cpu) / user,
            paid.sys_us_per_req
        );
    }
    if let (Some(ch), Some(bare)) = (get("challenge"), get("bare")) {
        let r = ch.rps / bare.rps;
        println!(
            "  challenge / bare                   = {r:.2}   (target ≥ 0.90: {})",
            verdict(r >= 0.9)
        );
        let r_cpu = bare.cpu_us_per_req / ch.cpu_us_per_req;
        println!(
            "    by CPU time per request          = {r_cpu:.2}   ({:.1} vs {:.1} µs/req; target ≥ 0.90: {})",
            ch.cpu_us_per_req,
            bare.cpu_us_per_req,
            verdict(r_cpu >= 0.9)
        );
        println!(
            "    kernel CPU µs/req                = {:.1} (challenge) vs {:.1} (bare)",
            ch.sys_us_per_req, bare.sys_us_per_req
        );
    }
    for (name, label) in [
        ("paid-deferred", "deferred p50 − verify-only p50    "),
        ("deferred-optimistic", "  without the pre-check           "),
        ("deferred tmpfs", "  journal on tmpfs                "),
        ("deferred-opt tmpfs", "  tmpfs, without the pre-check    "),
    ] {
        match (
            single(name),
            single("paid-memory"),
            get(name),
            get("paid-memory"),
        ) {
            (Some(d), Some(v), Some(dl), Some(vl)) => {
                let diff = d.p50_us - v.p50_us;
                println!(
                    "  {label} = {diff:.0} µs 1 conn ({:.0} vs {:.0}; target < 100 µs: {}); {:.0} µs at {} conns",
                    d.p50_us,
                    v.p50_us,
                    verdict(diff < 100.0),
                    dl.p50_us - vl.p50_us,
                    cfg.conns
                );
            }
            _ if name == "paid-deferred" => println!("  {label} = not run"),
            _ => {}
        }
    }
    if let (Some(ours), Some(peer)) = (get("paid-memory"), get("peer x402-axum")) {
        println!(
            "  ours / x402-axum, paid req/s       = {:.1}×   ({:.0} vs {:.0})",
            ours.rps / peer.rps,
            ours.rps,
            peer.rps
        );
        if let (Some(o1), Some(p1)) = (single("paid-memory"), single("peer x402-axum")) {
            println!(
                "  ours / x402-axum, p50 (1 conn)     = {:.3}    ({:.0} µs vs {:.0} µs)",
                o1.p50_us / p1.p50_us,
                o1.p50_us,
                p1.p50_us
            );
        }
        println!(
            "  ours / x402-axum, p50 ({} conns)   = {:.3}    ({:.0} µs vs {:.0} µs)",
            cfg.conns,
            ours.p50_us / peer.p50_us,
            ours.p50_us,
            peer.p50_us
        );
    }
    if let (Some(redis), Some(mem)) = (get("paid-redis"), get("paid-memory")) {
        println!(
            "  paid(redis) / paid(memory)         = {:.2}",
            redis.rps / mem.rps
        );
    }
    voucher_report(rows, recover_cpu);
    if let Some(m) = million {
        println!(
            "\n1M distinct paid requests (memory store, entries expire after 10 s): {} in {:.0} s ({:.0} req/s), {} errors",
            m.requests,
            m.secs,
            m.requests as f64 / m.secs,
            m.errors
        );
        let line: Vec<String> = m
            .checkpoints
            .iter()
            .map(|(n, rss)| format!("{}k: {rss:.0} MiB", n / 1000))
            .collect();
        println!("  server RSS  {}", line.join(", "));
        if let Some(e) = &m.first_error {
            println!("    first error: {e}");
        }
        if m.errors > 0 {
            failed = true;
        }
    }
    failed
}

// ------------------------------------------------------------------------------------------------
// Solana (issue #20 item 9): `paid-svm`, `SvmVerifier` in-process with a `MemoryNonceStore`
// and no settlement, fed pre-signed transactions (no RPC per request); its limit is a loop of
// the ed25519 verifications it makes (one per request, the payer's), on the server's core.

/// The accounts of `paid-svm` (fixed seeds: a benchmark's, not secrets).
fn svm_keys() -> (Keypair, Keypair, Keypair) {
    let key = Keypair::from_seed;
    (key([1; 32]), key([2; 32]), key([3; 32]))
}

fn svm_option() -> PaymentOption {
    let (fee_payer, _, pay_to) = svm_keys();
    PaymentOption::exact_svm(
        &SvmAsset::usdc_devnet(),
        PRICE,
        pay_to.pubkey(),
        fee_payer.pubkey(),
    )
    .expect("valid option")
}

/// `paid-svm`'s route.
fn svm_router(hello: axum::routing::MethodRouter) -> Result<Router, BoxError> {
    let layer = PaymentLayer::builder()
        .accept(svm_option())
        .verifier(SvmVerifier::new([svm_keys().0.pubkey()]))
        .nonce_store(MemoryNonceStore::new())
        // Transactions are signed before timing starts, from requirements built here.
        .no_challenge_binding()
        .build()?;
    Ok(Router::new().route(PATH, hello).route_layer(layer))
}

/// `n` distinct payment transactions as the official client builds them (a distinct memo
/// each), from `first` on; the blockhash is fixed (the verifier does not read the chain).
fn svm_transactions(first: usize, n: usize) -> Vec<Vec<u8>> {
    let (fee_payer, payer, pay_to) = svm_keys();
    let req = svm_option().requirements().clone();
    let amount = req.amount.to::<u64>();
    (first..first + n)
        .map(|i| {
            let memo = format!("{i:032x}");
            let transfer = svm::pay::Transfer {
                fee_payer: fee_payer.pubkey(),
                mint: tower_x402::svm::program::USDC_DEVNET,
                token_program: tower_x402::svm::program::TOKEN,
                decimals: 6,
                pay_to: pay_to.pubkey(),
                amount,
                blockhash: [7; 32],
                memo: memo.as_bytes(),
            };
            svm::pay::exact_transaction(&payer, &transfer)
        })
        .collect()
}

/// `n` payment headers for `paid-svm`, built on every core.
fn svm_headers(n: usize) -> Vec<HeaderValue> {
    let t0 = Instant::now();
    let req = svm_option().requirements().clone();
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let per = n.div_ceil(threads);
    let out: Vec<HeaderValue> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let req = &req;
                s.spawn(move || {
                    let count = per.min(n.saturating_sub(t * per));
                    svm_transactions(t * per, count)
                        .into_iter()
                        .map(|tx| {
                            let transaction = base64::engine::general_purpose::STANDARD.encode(tx);
                            encode(&json!({
                                "x402Version": 2,
                                "accepted": req,
                                "payload": {"transaction": transaction},
                            }))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("builder thread"))
            .collect()
    });
    eprintln!(
        "  built {} Solana payments in {:.1} s",
        out.len(),
        t0.elapsed().as_secs_f64()
    );
    out
}

/// `load svm-verify --secs S`: strict ed25519 verifications of the payer's signature over
/// pre-built transactions' messages (the key decompressed each time, as the verifier does);
/// prints `ED25519 <ops/s wall> <ops per CPU second>`.
fn svm_verify_loop(args: &[String]) -> Result<(), BoxError> {
    let txs = svm_transactions(0, 256);
    let payer = svm_keys().1.pubkey();
    let made: Vec<(Vec<u8>, [u8; 64])> = txs
        .iter()
        .map(|bytes| {
            let tx = svm::tx::decode(bytes).map_err(|e| format!("decode: {e:?}"))?;
            Ok((tx.message.to_vec(), *tx.signatures[1]))
        })
        .collect::<Result<_, BoxError>>()?;
    rate_loop(args, "ED25519", || {
        for (message, sig) in &made {
            let key = ed25519_dalek::VerifyingKey::from_bytes(payer.as_bytes())?;
            key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(sig))?;
        }
        Ok(made.len() as u64)
    })
}

/// The `paid-svm` row, with its limit measured just before it in the same run.
async fn svm_row(cfg: &Config) -> Result<Row, BoxError> {
    let (limit, limit_cpu) = loop_limit(cfg, "svm-verify", "ED25519")?;
    eprintln!("  ed25519 limit: {limit:.0} /s wall, {limit_cpu:.0} per CPU second");
    let headers = Rc::new(svm_headers(cfg.headers / 4));
    let server = our_server(cfg, "paid-svm", &[])?;
    let source = Source::signed(&headers);
    let mut row = measure(
        cfg,
        "paid-svm",
        &server,
        PAYMENT_SIGNATURE,
        source,
        StatusCode::OK,
    )
    .await?;
    if let Some(l) = &row.loaded {
        row.note = format!(
            "limit: ed25519 verify {limit:.0}/s = {:.1} µs CPU; paid/limit {:.2}, by CPU {:.2}",
            1e6 / limit_cpu,
            l.rps / limit,
            (1e6 / limit_cpu) / l.cpu_us_per_req
        );
    }
    Ok(row)
}

// ------------------------------------------------------------------------------------------------
// Payment channels (`batch-settlement`, issue #19): requests paid by cumulative vouchers.
//
// The server (`serve voucher-memory` / `serve voucher-redis`) seeds `--channels N` channel
// records directly into its store (deposited balance mirrored, nothing charged yet): a voucher
// needs no chain, and its escrow ([`NoChain`]) fails any call, so a voucher row proves that
// no RPC is made per request. The client pre-signs each channel's vouchers (the k-th has the
// ceiling k prices: cumulative) and gives each connection a channel of its own.

/// The price of a voucher request (atomic USDC: $0.001).
const VOUCHER_PRICE: u128 = 1_000;
/// The receiver authorizer the voucher option names (anvil #5's address; it signs nothing here).
const VOUCHER_AUTHORIZER: Address = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");

fn voucher_option() -> PaymentOption {
    PaymentOption::batch_settlement(
        &Asset::usdc_base_sepolia(),
        U256::from(VOUCHER_PRICE),
        PAY_TO,
        VOUCHER_AUTHORIZER,
        900,
        tower_x402::channel::AssetTransferMethod::Eip3009,
    )
    .expect("valid option")
}

/// Channel `i` of the demo payer (its own payer authorizer), salt `i`.
fn voucher_channel(i: usize) -> (tower_x402::proto::batch::ChannelConfig, B256) {
    let req = voucher_option().requirements().clone();
    let config = tower_x402::proto::batch::ChannelConfig {
        payer: demo_payer().address(),
        payer_authorizer: demo_payer().address(),
        receiver: PAY_TO,
        receiver_authorizer: VOUCHER_AUTHORIZER,
        token: req.asset.evm().unwrap_or_default(),
        withdraw_delay: 900,
        salt: B256::from(U256::from(i)),
    };
    let id = tower_x402::channel::channel_id(req.network.chain_id(), &config);
    (config, id)
}

/// The voucher scenarios' escrow: there is no chain. Voucher-only requests never call it;
/// a call fails the request (and the row) loudly.
struct NoChain;

#[async_trait::async_trait]
impl tower_x402::channel::serve::Escrow for NoChain {
    async fn deposit(
        &self,
        _: tower_x402::channel::serve::EscrowChannel<'_>,
        _: &tower_x402::proto::batch::Deposit,
    ) -> Result<tower_x402::channel::serve::Mirror, tower_x402::channel::serve::EscrowError> {
        Err(tower_x402::channel::serve::EscrowError(
            "the voucher scenarios have no chain: no RPC per request".into(),
        ))
    }
    async fn refund(
        &self,
        _: tower_x402::channel::serve::EscrowChannel<'_>,
        _: tower_x402::channel::serve::CooperativeRefund,
    ) -> Result<tower_x402::channel::serve::Mirror, tower_x402::channel::serve::EscrowError> {
        Err(tower_x402::channel::serve::EscrowError(
            "the voucher scenarios have no chain: no RPC per request".into(),
        ))
    }
}

/// The voucher server's layer: channels `0..channels` seeded into `store` with a deposit
/// mirrored and nothing charged.
async fn voucher_layer<S: tower_x402::channel::store::ChannelStore>(
    store: S,
    channels: usize,
) -> Result<PaymentLayer, BoxError> {
    use tower_x402::channel::store::ChannelState;
    let now = unix_now();
    for i in 0..channels {
        let (config, id) = voucher_channel(i);
        let state = ChannelState {
            config,
            charged_cumulative: 0,
            signed_max_claimable: 0,
            signature: ABytes::new(),
            balance: 1_000_000_000_000,
            total_claimed: 0,
            withdraw_requested_at: 0,
            refund_nonce: U256::ZERO,
            onchain_synced_at: now,
            last_request_at: now,
        };
        if !store.commit(id, None, state).await? {
            return Err(format!("channel {i} already has a record").into());
        }
    }
    Ok(PaymentLayer::builder()
        // Vouchers are signed before timing starts, from requirements built here, not a 402.
        .no_challenge_binding()
        .accept(voucher_option())
        .channels(tower_x402::channel::serve::Channels::new(store, NoChain))
        .build()?)
}

/// The router of `serve voucher-memory` / `serve voucher-redis` (`--channels N`, default 1;
/// Redis keys under a prefix of this process's own, so a shared Redis starts empty).
async fn voucher_router(
    scenario: &str,
    value: &dyn Fn(&str) -> Option<String>,
) -> Result<Router, BoxError> {
    let channels: usize = value("--channels").map_or(Ok(1), |v| v.parse())?;
    let layer = match scenario {
        "voucher-memory" => {
            voucher_layer(
                tower_x402::channel::store::MemoryChannelStore::new(),
                channels,
            )
            .await?
        }
        _ => {
            let url = value("--redis").ok_or("voucher-redis needs --redis URL")?;
            let store = tower_x402::channel::redis::RedisChannelStore::connect(&url)
                .await?
                .with_prefix(format!("bench:{}:channel:", std::process::id()));
            voucher_layer(store, channels).await?
        }
    };
    Ok(Router::new()
        .route(PATH, get(|| async { "hello" }))
        .route_layer(layer))
}

/// Pre-signed voucher headers: for channel `i`, `per[i]` cumulative vouchers (ceilings 1, 2,
/// ... prices), signed on every core with libsecp256k1 (before any measurement).
fn sign_vouchers(per: &[usize]) -> Vec<Vec<HeaderValue>> {
    use tower_x402::proto::batch::{BatchEvmPayload, Voucher};
    let t0 = Instant::now();
    let accepted = serde_json::to_value(voucher_option().requirements()).expect("json");
    let chain_id = voucher_option().requirements().network.chain_id();
    let key = FastSigner::new(option().requirements().clone()).key;
    let sign_channel = |i: usize, n: usize| -> Vec<HeaderValue> {
        let (config, id) = voucher_channel(i);
        (1..=n)
            .map(|k| {
                let ceiling = U256::from(VOUCHER_PRICE * k as u128);
                let digest = tower_x402::channel::voucher_digest(chain_id, id, ceiling)
                    .expect("ceiling fits in u128");
                let (recid, rs) = SECP256K1
                    .sign_ecdsa_recoverable(Message::from_digest(digest.0), &key)
                    .serialize_compact();
                let mut sig = rs.to_vec();
                sig.push(27 + i32::from(recid) as u8);
                let payload = BatchEvmPayload::Voucher {
                    channel_config: config.clone(),
                    voucher: Voucher {
                        channel_id: id,
                        max_claimable_amount: ceiling,
                        signature: ABytes::from(sig),
                    },
                };
                encode(&json!({ "x402Version": 2, "accepted": accepted, "payload": payload }))
            })
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let out: Vec<Vec<HeaderValue>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let sign_channel = &sign_channel;
                s.spawn(move || {
                    (t..per.len())
                        .step_by(threads)
                        .map(|i| (i, sign_channel(i, per[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Vec<HeaderValue>)> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("signer thread"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, v)| v).collect()
    });
    eprintln!(
        "  signed {} vouchers on {} channels in {:.1} s",
        per.iter().sum::<usize>(),
        per.len(),
        t0.elapsed().as_secs_f64()
    );
    out
}

/// The voucher rows of `drive`, memory then Redis: `conns` channels for the loaded phase and
/// one more, with a quarter of the vouchers, for the one-connection phase.
async fn voucher_rows(cfg: &Config) -> Result<Vec<Row>, BoxError> {
    let mut per = vec![(cfg.headers * 3 / 4 / cfg.conns).max(1); cfg.conns];
    per.push((cfg.headers / 4).max(1));
    let channels = per.len().to_string();
    let mut rows = Vec::new();
    let server = our_server(cfg, "voucher-memory", &["--channels", &channels])?;
    let source = Source::vouchers(sign_vouchers(&per));
    rows.push(
        measure(
            cfg,
            "voucher-memory",
            &server,
            PAYMENT_SIGNATURE,
            source,
            StatusCode::OK,
        )
        .await?,
    );
    drop(server);
    match Redis::start(cfg)? {
        Some(redis) => {
            let server = our_server(
                cfg,
                "voucher-redis",
                &["--channels", &channels, "--redis", &redis.url()],
            )?;
            let source = Source::vouchers(sign_vouchers(&per));
            rows.push(
                measure(
                    cfg,
                    "voucher-redis",
                    &server,
                    PAYMENT_SIGNATURE,
                    source,
                    StatusCode::OK,
                )
                .await?,
            );
        }
        None => rows.push(Row::skipped(
            "voucher-redis",
            "SKIPPED: redis-server not installed",
        )),
    }
    Ok(rows)
}

/// The voucher rows' targets (issue #19 item 9): server CPU per request ≤ bare axum's + 1.10 ×
/// one recovery, in the same run.
fn voucher_report(rows: &[Row], recover_cpu: f64) {
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.loaded.as_ref())
    };
    let Some(bare) = get("bare") else {
        return;
    };
    let recovery = 1e6 / recover_cpu;
    let limit = bare.cpu_us_per_req + 1.10 * recovery;
    for name in ["voucher-memory", "voucher-redis"] {
        if let Some(v) = get(name) {
            println!(
                "  {name:<14} CPU µs/req          = {:.1}   (bare {:.1} + {:.2} × recovery {:.1}; target ≤ {limit:.1} = bare + 1.10 × recovery: {})",
                v.cpu_us_per_req,
                bare.cpu_us_per_req,
                (v.cpu_us_per_req - bare.cpu_us_per_req) / recovery,
                recovery,
                verdict(v.cpu_us_per_req <= limit)
            );
        }
    }
    if let (Some(v), Some(p)) = (get("voucher-memory"), get("paid-memory")) {
        println!(
            "  voucher(memory) / paid(memory), req/s = {:.2}   ({:.0} vs {:.0})",
            v.rps / p.rps,
            v.rps,
            p.rps
        );
    }
}
