//! `RedisNonceStore` against a real `redis-server`: lifecycle, races across instances, the
//! HTTP layer on two "servers" sharing one Redis, fail-closed behaviour and expiry.
//!
//! Each test starts its own `redis-server` on a free loopback port (no persistence) and kills
//! it when done, also when the test panics (`tests/common/redis_server.rs`). Without
//! `redis-server` on the PATH: with `CI=true` the tests fail; otherwise they print SKIPPED and
//! pass, so a bare `cargo test` works anywhere (`scripts/test` installs the Debian package
//! `redis-server`).
#![cfg(all(feature = "redis", feature = "test-util"))]

#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis::AsyncCommands;
use tower_x402::clock::FixedClock;
use tower_x402::error::ConfigError;
use tower_x402::nonce::{
    ClaimToken, NonceKey, NonceStore, RedisNonceStore, Reservation, StoreError,
};
use tower_x402::primitives::{Address, B256, address};
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::test_util::{demo_payer, pay, random_nonce};
use tower_x402::{Asset, ChallengeKeys, ExactEvmVerifier, PaymentLayer, PaymentOption};

use redis_server::{RedisServer, free_port};

const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";

// ------------------------------------------------------------------------------------------------
// Helpers

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn random_key() -> NonceKey {
    NonceKey {
        chain_id: 84532,
        asset: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        from: Address::repeat_byte(0x11),
        nonce: random_nonce(),
    }
}

async fn store(server: &RedisServer) -> RedisNonceStore {
    RedisNonceStore::connect(&server.url())
        .await
        .expect("connect to the test redis")
}

/// A plain connection to inspect keys.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

fn option() -> PaymentOption {
    PaymentOption::exact(
        &Asset::usdc_base_sepolia(),
        "$0.001",
        address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    )
    .expect("valid option")
}

/// Serves `GET /paid` behind a `PaymentLayer` on `store`, counting handler runs in `hits`.
async fn serve(
    store: RedisNonceStore,
    clock_now: u64,
    hits: Arc<AtomicUsize>,
) -> (String, tokio::task::JoinHandle<()>) {
    serve_bound(store, clock_now, hits, None).await
}

/// [`serve`], binding challenges with `keys` (`None`: opted out, proofs are signed from
/// requirements built here).
async fn serve_bound(
    store: RedisNonceStore,
    clock_now: u64,
    hits: Arc<AtomicUsize>,
    keys: Option<ChallengeKeys>,
) -> (String, tokio::task::JoinHandle<()>) {
    let bound = keys.is_some();
    let builder = match keys {
        Some(keys) => PaymentLayer::builder().bind_challenges(keys),
        None => PaymentLayer::builder().no_challenge_binding(),
    };
    let builder = if bound {
        // Behind a load balancer every instance sees the same public URL.
        builder.resource_base("http://api.test")
    } else {
        builder
    };
    let layer = builder
        .accept(option())
        .verifier(ExactEvmVerifier::new().with_clock(FixedClock::new(clock_now)))
        .nonce_store(store)
        .build()
        .expect("layer");
    let app = Router::new()
        .route(
            "/paid",
            get(move || {
                hits.fetch_add(1, Ordering::SeqCst);
                async { "paid content" }
            }),
        )
        .route_layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/paid", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `url` with the payment header; status, headers and body. Bounded by 10 s.
async fn get_paid(
    client: &HttpClient,
    url: &str,
    header: &(HeaderName, HeaderValue),
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = http::Request::get(url)
        .header(header.0.clone(), header.1.clone())
        .body(Empty::new())
        .expect("request");
    let fut = async {
        let res = client.request(req).await.expect("response");
        let (parts, body) = res.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.expect("body").to_bytes(),
        )
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("request within 10 s")
}

/// The first requirement of `url`'s 402, as a client reads it (`extra.challenge` included).
async fn challenge(client: &HttpClient, url: &str) -> PaymentRequirements {
    let req = http::Request::get(url).body(Empty::new()).expect("request");
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("402 within 10 s")
        .expect("response");
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let raw = res
        .headers()
        .get("payment-required")
        .expect("PAYMENT-REQUIRED");
    let json = base64::engine::general_purpose::STANDARD
        .decode(raw.as_bytes())
        .expect("base64");
    let doc: tower_x402::proto::v2::PaymentRequired =
        serde_json::from_slice(&json).expect("challenge");
    doc.accepts.into_iter().next().expect("one requirement")
}

/// The `error` of the `PAYMENT-REQUIRED` challenge.
fn challenge_reason(headers: &http::HeaderMap) -> Option<String> {
    let raw = headers.get("payment-required")?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(raw.as_bytes())
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    v.get("error")?.as_str().map(str::to_owned)
}

// ------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn lifecycle_and_key_layout() {
    let Some(server) = RedisServer::start("lifecycle_and_key_layout") else {
        return;
    };
    let s = store(&server).await.with_prefix("t1:");
    let key = random_key();
    let far = now() + 60;

    let Reservation::Reserved(t) = s.reserve(&key, far).await.unwrap() else {
        panic!("first reserve must win")
    };
    assert_eq!(s.reserve(&key, far).await.unwrap(), Reservation::InUse);
    let stranger = ClaimToken(t.0 ^ 1);
    assert!(matches!(
        s.release(&key, stranger).await,
        Err(StoreError::NotHeld)
    ));
    assert!(matches!(
        s.consume(&key, stranger).await,
        Err(StoreError::NotHeld)
    ));
    assert_eq!(
        s.reserve(&key, far).await.unwrap(),
        Reservation::InUse,
        "a stranger changed nothing"
    );

    s.release(&key, t).await.unwrap();
    let Reservation::Reserved(t2) = s.reserve(&key, far).await.unwrap() else {
        panic!("a released key is free again")
    };
    assert!(
        matches!(s.release(&key, t).await, Err(StoreError::NotHeld)),
        "the old token is dead"
    );
    assert!(matches!(
        s.consume(&key, stranger).await,
        Err(StoreError::NotHeld)
    ));
    s.consume(&key, t2).await.unwrap();
    s.consume(&key, t2).await.unwrap(); // idempotent for the holder
    assert_eq!(s.reserve(&key, far).await.unwrap(), Reservation::Used);
    assert!(
        matches!(s.release(&key, t2).await, Err(StoreError::NotHeld)),
        "a used key cannot be released"
    );
    assert!(matches!(
        s.consume(&key, stranger).await,
        Err(StoreError::NotHeld)
    ));
    assert!(
        matches!(s.release(&random_key(), t2).await, Err(StoreError::NotHeld)),
        "absent key"
    );

    // Key layout: prefix + hex(chain_id BE u64 ‖ asset ‖ from ‖ nonce), value `<token>:u`,
    // expiry kept at validBefore through consume.
    let mut raw_key = String::from("t1:");
    raw_key.push_str(&format!("{:016x}", key.chain_id));
    for part in [
        key.asset.as_slice(),
        key.from.as_slice(),
        key.nonce.as_slice(),
    ] {
        for b in part {
            raw_key.push_str(&format!("{b:02x}"));
        }
    }
    assert_eq!(s.redis_key(&key), raw_key);
    assert_eq!(raw_key.len(), 3 + 160);
    let mut r = raw(&server).await;
    let v: String = r.get(&raw_key).await.unwrap();
    assert_eq!(v, format!("{:032x}:u", t2.0));
    let at: i64 = redis::cmd("PEXPIRETIME")
        .arg(&raw_key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        at,
        i64::try_from(far * 1000).unwrap(),
        "PXAT validBefore, kept by KEEPTTL"
    );

    // Keys under another prefix are independent.
    let other = store(&server).await.with_prefix("t1b:");
    assert!(matches!(
        other.reserve(&key, far).await.unwrap(),
        Reservation::Reserved(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_across_two_instances_have_one_winner() {
    let Some(server) =
        RedisServer::start("concurrent_reserves_across_two_instances_have_one_winner")
    else {
        return;
    };
    // Two instances: two connection managers, two connections.
    let a = store(&server).await;
    let b = store(&server).await;
    let far = now() + 60;
    for round in 0..8 {
        let key = random_key();
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.reserve(&key, far).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut in_use = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                Reservation::Reserved(token) => winners.push(token),
                Reservation::InUse => in_use += 1,
                Reservation::Used => panic!("nobody consumed yet"),
            }
        }
        assert_eq!(
            (winners.len(), in_use),
            (1, 63),
            "round {round}: exactly one winner"
        );
        // The winner may consume through the other instance: the token is what counts.
        b.consume(&key, winners[0]).await.unwrap();
        assert_eq!(a.reserve(&key, far).await.unwrap(), Reservation::Used);
        assert_eq!(b.reserve(&key, far).await.unwrap(), Reservation::Used);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_one_redis_one_proof_serves_once() {
    let Some(server) = RedisServer::start("two_servers_one_redis_one_proof_serves_once") else {
        return;
    };
    let t = now();
    let hits = Arc::new(AtomicUsize::new(0));
    let (url_a, task_a) = serve(store(&server).await, t, hits.clone()).await;
    let (url_b, task_b) = serve(store(&server).await, t, hits.clone()).await;
    let header = pay(&demo_payer(), option().requirements(), t, X402Version::V2);
    let client = client();

    let started = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let url = if i % 2 == 0 {
                url_a.clone()
            } else {
                url_b.clone()
            };
            let (client, header, barrier) = (client.clone(), header.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let (status, headers, _) = get_paid(&client, &url, &header).await;
                (status, challenge_reason(&headers))
            })
        })
        .collect();
    let mut ok = 0;
    let mut replays = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::PAYMENT_REQUIRED, Some(reason)) if reason == NONCE_USED => replays += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!(
        "64 concurrent requests over two servers: {:?}",
        started.elapsed()
    );
    assert_eq!(
        (ok, replays),
        (1, 63),
        "exactly one 200, 63 replays refused"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the handler ran once");

    // Later replays, on either server, are refused too.
    for url in [&url_a, &url_b] {
        let (status, headers, _) = get_paid(&client, url, &header).await;
        assert_eq!(
            (status, challenge_reason(&headers).as_deref()),
            (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED))
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    task_a.abort();
    task_b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_one_redis_need_one_challenge_key() {
    let Some(server) = RedisServer::start("two_servers_one_redis_need_one_challenge_key") else {
        return;
    };
    // Bound by default with a key of this process: next to a shared store, that would make
    // every instance refuse the others' challenges, so it does not build.
    let err = PaymentLayer::builder()
        .accept(option())
        .nonce_store(store(&server).await)
        .build()
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, ConfigError::ChallengeKeyRequired), "{err:?}");

    let t = now();
    let hits = Arc::new(AtomicUsize::new(0));
    let keys = ChallengeKeys::new([0x5a; 32]);
    let (url_a, task_a) =
        serve_bound(store(&server).await, t, hits.clone(), Some(keys.clone())).await;
    let (url_b, task_b) = serve_bound(store(&server).await, t, hits.clone(), Some(keys)).await;
    let other = Some(ChallengeKeys::new([0x6b; 32]));
    let (url_c, task_c) = serve_bound(store(&server).await, t, hits.clone(), other).await;
    let client = client();

    // A challenge of A, paid at C (another key): refused before the nonce is claimed.
    let req = challenge(&client, &url_a).await;
    let header = pay(&demo_payer(), &req, t, X402Version::V2);
    let (status, headers, _) = get_paid(&client, &url_c, &header).await;
    assert_eq!(
        (status, challenge_reason(&headers).as_deref()),
        (StatusCode::PAYMENT_REQUIRED, Some("invalid_challenge"))
    );
    // A proof that does not echo a challenge is refused by every instance.
    let unechoed = pay(&demo_payer(), option().requirements(), t, X402Version::V2);
    let (_, headers, _) = get_paid(&client, &url_b, &unechoed).await;
    assert_eq!(
        challenge_reason(&headers).as_deref(),
        Some("invalid_challenge")
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    // The same key on A and B: A's challenge pays at B, once; the replay at A is refused.
    let (status, _, body) = get_paid(&client, &url_b, &header).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, headers, _) = get_paid(&client, &url_a, &header).await;
    assert_eq!(
        (status, challenge_reason(&headers).as_deref()),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED))
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for task in [task_a, task_b, task_c] {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_recovers_without_rebuild() {
    let Some(mut server) =
        RedisServer::start("redis_down_fails_closed_and_recovers_without_rebuild")
    else {
        return;
    };
    let t = now();
    let hits = Arc::new(AtomicUsize::new(0));
    let s = store(&server)
        .await
        .with_retry_after(Duration::from_secs(2));
    let (url, task) = serve(s, t, hits.clone()).await;
    let client = client();
    let req = option();

    let (status, _, _) = get_paid(
        &client,
        &url,
        &pay(&demo_payer(), req.requirements(), t, X402Version::V2),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "works while redis is up");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    server.stop();
    let header = pay(&demo_payer(), req.requirements(), t, X402Version::V2);
    for i in 0..3 {
        let started = Instant::now();
        let (status, headers, _) = get_paid(&client, &url, &header).await;
        let took = started.elapsed();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {i} while redis is down"
        );
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("2")
        );
        assert!(took < Duration::from_secs(2), "failed fast ({took:?})");
        eprintln!("redis down, request {i}: 503 in {took:?}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the handler did not run while redis was down"
    );

    // Back on the same port: the same store reconnects; the proof refused with 503 was never
    // claimed, so it still pays.
    server.restart();
    let restarted = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (status, headers, _) = get_paid(&client, &url, &header).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 503 while reconnecting"
        );
        assert!(headers.contains_key("retry-after"));
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no recovery within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "redis restarted: 200 after {attempts} request(s), {:?}",
        restarted.elapsed()
    );
    assert_eq!(attempts, 1, "the first request after the restart succeeds");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let (status, headers, _) = get_paid(&client, &url, &header).await;
    assert_eq!(
        (status, challenge_reason(&headers).as_deref()),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED))
    );

    // A store pointed at a closed port fails to connect within its bound, with Unavailable.
    let closed = format!("redis://127.0.0.1:{}/", free_port());
    let started = Instant::now();
    let err = RedisNonceStore::connect(&closed)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, StoreError::Unavailable { .. }) && err.is_retryable());
    assert!(started.elapsed() <= RedisNonceStore::CONNECT_TIMEOUT + Duration::from_millis(500));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_times_out_and_a_lost_reply_stays_blocked() {
    let Some(server) = RedisServer::start("stalled_redis_times_out_and_a_lost_reply_stays_blocked")
    else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let s = store(&server)
        .await
        .with_timeout(timeout)
        .with_retry_after(Duration::from_secs(3));
    let far = now() + 60;
    let key = random_key();
    // Warm up: the scripts are loaded, so the stalled call below is one queued EVALSHA.
    assert!(matches!(
        s.reserve(&random_key(), far).await.unwrap(),
        Reservation::Reserved(_)
    ));

    server.signal("-STOP");
    let started = Instant::now();
    let err = s
        .reserve(&key, far)
        .await
        .expect_err("a stalled redis is unavailable");
    let took = started.elapsed();
    server.signal("-CONT");
    assert!(matches!(err, StoreError::Unavailable { .. }));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(300),
        "deadline kept: {took:?}"
    );
    eprintln!("stalled redis: Unavailable after {took:?}");

    // Redis ran the reserve once resumed, but nobody got its token: the proof stays blocked
    // (until validBefore), never free twice.
    assert_eq!(s.reserve(&key, far).await.unwrap(), Reservation::InUse);
    assert!(matches!(
        s.reserve(&random_key(), far).await.unwrap(),
        Reservation::Reserved(_)
    ));
}

#[tokio::test]
async fn reservations_expire_by_redis_clock() {
    let Some(server) = RedisServer::start("reservations_expire_by_redis_clock") else {
        return;
    };
    let s = store(&server).await.with_prefix("t5:");
    let mut r = raw(&server).await;
    let start = now();
    let soon = start + 2;

    let key = random_key();
    assert!(matches!(
        s.reserve(&key, soon).await.unwrap(),
        Reservation::Reserved(_)
    ));
    assert_eq!(s.reserve(&key, soon).await.unwrap(), Reservation::InUse);
    let pttl: i64 = r.pttl(s.redis_key(&key)).await.unwrap();
    assert!(
        pttl > 0 && pttl <= 2000,
        "expires at validBefore: pttl {pttl}"
    );

    // Already expired: held for the minimum TTL (1 s), never forever.
    let late = random_key();
    let Reservation::Reserved(token) = s.reserve(&late, start - 10).await.unwrap() else {
        panic!("an expired validBefore still reserves, briefly")
    };
    assert_eq!(
        s.reserve(&late, start - 10).await.unwrap(),
        Reservation::InUse
    );
    let pttl: i64 = r.pttl(s.redis_key(&late)).await.unwrap();
    assert!(
        pttl > 0 && pttl <= 1000,
        "held for the minimum TTL: pttl {pttl}"
    );
    s.consume(&late, token).await.unwrap();
    // Expiry 0 (1970) and the largest u64 are accepted too.
    assert!(matches!(
        s.reserve(&random_key(), 0).await.unwrap(),
        Reservation::Reserved(_)
    ));
    assert!(matches!(
        s.reserve(&random_key(), u64::MAX).await.unwrap(),
        Reservation::Reserved(_)
    ));

    // A real wait, on Redis's clock: until just past `soon`.
    let until = UNIX_EPOCH + Duration::from_secs(soon) + Duration::from_millis(100);
    if let Ok(wait) = until.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let exists: bool = r.exists(s.redis_key(&key)).await.unwrap();
    assert!(!exists, "gone after validBefore");
    let exists: bool = r.exists(s.redis_key(&late)).await.unwrap();
    assert!(!exists, "gone after the minimum TTL");
    assert!(matches!(
        s.reserve(&key, now() + 60).await.unwrap(),
        Reservation::Reserved(_)
    ));
    assert!(matches!(
        s.reserve(&late, now() + 60).await.unwrap(),
        Reservation::Reserved(_)
    ));
}

#[test]
fn store_debug_hides_the_connection() {
    // Needs no server: only checks the key function and Debug on a lazy manager.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open("redis://:secret@127.0.0.1:1/").unwrap();
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .unwrap();
        let s = RedisNonceStore::new(conn).with_timeout(Duration::from_millis(50));
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
        let key = NonceKey {
            chain_id: 1,
            asset: Address::ZERO,
            from: Address::ZERO,
            nonce: B256::ZERO,
        };
        assert_eq!(
            s.redis_key(&key),
            format!("x402:nonce:{:0>16}{}", "1", "0".repeat(144))
        );
        // Nothing listens on port 1: fails closed, fast.
        let started = Instant::now();
        assert!(matches!(
            s.reserve(&key, u64::MAX).await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
    });
}

// ------------------------------------------------------------------------------------------------
// Idempotency (payment-identifier) in Redis

mod idempotency {
    use super::*;
    use tower_x402::idempotency::{
        Begin, Fingerprint, IdempotencyKey, IdempotencyStore, PaymentId, RedisIdempotencyStore,
        StoredResponse,
    };
    use tower_x402::proto::header::PAYMENT_SIGNATURE;
    use tower_x402::test_util::{encode, exact_payload, v2_json};

    const ID: &str = "pay_0a1b2c3d4e5f60718293a4b5c6d7e8f9";

    fn key(id: &str) -> IdempotencyKey {
        IdempotencyKey {
            payer: Address::repeat_byte(0x22),
            id: PaymentId::parse(id).unwrap(),
        }
    }

    fn stored(body: &'static str) -> StoredResponse {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-test", HeaderValue::from_static("1"));
        StoredResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            rejection: None,
        }
    }

    /// A v2 proof with `id` in `extensions["payment-identifier"].info.id`.
    fn proof(t: u64, id: &str) -> (HeaderName, HeaderValue) {
        let req = option().requirements().clone();
        let payload = exact_payload(&demo_payer(), &req, t);
        let mut json = v2_json(&req, &payload, None);
        json["extensions"] = serde_json::json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
        (PAYMENT_SIGNATURE, encode(&json))
    }

    /// `GET /paid` behind a layer with both stores on `server`; the handler counts its runs
    /// and answers with a per-run body, so a second run would show.
    async fn serve(
        server: &RedisServer,
        clock_now: u64,
        hits: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let nonces = store(server).await;
        let ids = RedisIdempotencyStore::new(nonces.connection());
        let layer = PaymentLayer::builder()
            .no_challenge_binding()
            .accept(option())
            .verifier(ExactEvmVerifier::new().with_clock(FixedClock::new(clock_now)))
            .nonce_store(nonces)
            .idempotency(ids)
            .build()
            .expect("layer");
        let app = Router::new()
            .route(
                "/paid",
                get(move || {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let gate = gate.clone();
                    async move {
                        let _permit = gate.acquire().await;
                        format!("paid content, run {n}")
                    }
                }),
            )
            .route_layer(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/paid", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (url, task)
    }

    fn reason(headers: &http::HeaderMap, body: &Bytes) -> Option<String> {
        challenge_reason(headers).or_else(|| {
            let v: serde_json::Value = serde_json::from_slice(body).ok()?;
            v.get("error")?.as_str().map(str::to_owned)
        })
    }

    #[tokio::test]
    async fn idempotency_store_lifecycle_key_layout_and_expiry() {
        let Some(server) = RedisServer::start("idempotency_store_lifecycle_key_layout_and_expiry")
        else {
            return;
        };
        let s = RedisIdempotencyStore::connect(&server.url())
            .await
            .unwrap()
            .with_prefix("i1:");
        let mut r = raw(&server).await;
        let k = key(ID);
        let fp = Fingerprint(B256::repeat_byte(1));
        let other = Fingerprint(B256::repeat_byte(2));
        let far = now() + 60;

        let Begin::Started(t) = s.begin(&k, fp, far).await.unwrap() else {
            panic!("first begin wins")
        };
        assert_eq!(s.begin(&k, fp, far).await.unwrap(), Begin::InProgress);
        assert_eq!(s.begin(&k, other, far).await.unwrap(), Begin::Conflict);
        let stranger = ClaimToken(t.0 ^ 1);
        assert!(matches!(
            s.complete(&k, stranger, &stored("x")).await,
            Err(StoreError::NotHeld)
        ));
        assert!(matches!(
            s.abort(&k, stranger).await,
            Err(StoreError::NotHeld)
        ));
        s.complete(&k, t, &stored("hello")).await.unwrap();
        s.complete(&k, t, &stored("hello")).await.unwrap(); // a retried complete
        assert_eq!(
            s.begin(&k, fp, far).await.unwrap(),
            Begin::Done(Box::new(stored("hello")))
        );
        assert_eq!(s.begin(&k, other, far).await.unwrap(), Begin::Conflict);
        assert!(
            matches!(s.abort(&k, t).await, Err(StoreError::NotHeld)),
            "done stays"
        );

        // Layout: prefix, payer hex, ':', id; expiry at validBefore, kept by complete.
        let redis_key = format!("i1:{}:{ID}", "22".repeat(20));
        assert_eq!(s.redis_key(&k), redis_key);
        let v: Vec<u8> = r.get(&redis_key).await.unwrap();
        assert_eq!(v[0], b'd');
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(&redis_key)
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(at, i64::try_from(far * 1000).unwrap());

        // Aborted ids are free again.
        let k2 = key("pay_aborted_0123456789");
        let Begin::Started(t2) = s.begin(&k2, fp, far).await.unwrap() else {
            panic!()
        };
        s.abort(&k2, t2).await.unwrap();
        assert!(matches!(
            s.begin(&k2, other, far).await.unwrap(),
            Begin::Started(_)
        ));

        // Capped at the maximum TTL, by Redis's clock: gone after it.
        let short = s
            .clone()
            .with_max_ttl(Duration::from_millis(300))
            .with_min_ttl(Duration::from_millis(100));
        let k3 = key("pay_expiring_0123456789");
        let Begin::Started(t3) = short.begin(&k3, fp, far).await.unwrap() else {
            panic!()
        };
        short.complete(&k3, t3, &stored("soon gone")).await.unwrap();
        let pttl: i64 = r.pttl(short.redis_key(&k3)).await.unwrap();
        assert!(pttl > 0 && pttl <= 300, "pttl {pttl}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(
            short.begin(&k3, other, far).await.unwrap(),
            Begin::Started(_)
        ));

        // A value that does not decode fails closed.
        let k4 = key("pay_corrupt_0123456789");
        let _: () = r
            .set(s.redis_key(&k4), format!("d{}junk", "01".repeat(32)))
            .await
            .unwrap();
        assert!(matches!(
            s.begin(&k4, fp, far).await,
            Err(StoreError::Unavailable { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_one_redis_replay_the_stored_response() {
        let Some(mut server) =
            RedisServer::start("two_servers_one_redis_replay_the_stored_response")
        else {
            return;
        };
        let t = now();
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (url_a, task_a) = serve(&server, t, hits.clone(), gate.clone()).await;
        let (url_b, task_b) = serve(&server, t, hits.clone(), gate.clone()).await;
        let client = client();

        // 64 duplicates over both servers while the first run is held in its handler.
        let header = proof(t, ID);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let url = if i % 2 == 0 {
                    url_a.clone()
                } else {
                    url_b.clone()
                };
                let (client, header) = (client.clone(), header.clone());
                tokio::spawn(async move { get_paid(&client, &url, &header).await })
            })
            .collect();
        let started = Instant::now();
        while hits.load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "no handler run");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.add_permits(1000);
        let mut ok = Vec::new();
        let mut in_progress = 0;
        for task in tasks {
            let (status, headers, body) = task.await.unwrap();
            match status {
                StatusCode::OK => ok.push((headers, body)),
                StatusCode::SERVICE_UNAVAILABLE
                    if reason(&headers, &body).as_deref() == Some("payment_in_progress") =>
                {
                    in_progress += 1
                }
                other => panic!("unexpected {other}: {:?}", reason(&headers, &body)),
            }
        }
        eprintln!(
            "64 duplicates over two servers: {} x 200, {in_progress} x 503",
            ok.len()
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "exactly one handler run");
        assert_eq!(ok.len() + in_progress, 64);

        // A retry on either server gets the stored response: same body, same receipt.
        let (status, headers, body) = get_paid(&client, &url_a, &header).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"paid content, run 0"[..])
        );
        let receipt = headers.get("payment-response").cloned().expect("receipt");
        for url in [&url_a, &url_b] {
            let (s2, h2, b2) = get_paid(&client, url, &header).await;
            assert_eq!((s2, &b2), (StatusCode::OK, &body));
            assert_eq!(h2.get("payment-response"), Some(&receipt));
        }
        for (h, b) in &ok {
            assert_eq!((b, h.get("payment-response")), (&body, Some(&receipt)));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // Another proof with the same id: 409 on either server.
        let (status, headers, body) = get_paid(&client, &url_b, &proof(t, ID)).await;
        assert_eq!(
            (status, reason(&headers, &body).as_deref()),
            (StatusCode::CONFLICT, Some("payment_identifier_conflict"))
        );

        // Redis down: fails closed before the handler.
        server.stop();
        let (status, headers, _) =
            get_paid(&client, &url_a, &proof(t, "pay_while_redis_is_down_01")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        task_a.abort();
        task_b.abort();
    }
}
