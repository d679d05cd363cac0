//! `PostgresNonceStore` against a real PostgreSQL: the shared `NonceStore` contract (also run
//! here against the memory and Redis stores), the schema and its prefix, races across
//! instances, two layers ("instances") sharing one database, and fail-closed behaviour with
//! recovery.
//!
//! Each test starts its own PostgreSQL (`tests/common/postgres.rs`: `initdb` in a temp dir, a
//! free loopback port, run as `nobody` under root). Without PostgreSQL installed: SKIPPED, or
//! a failure under `CI=true` (`scripts/install-test-deps.sh` installs Debian's `postgresql`).
#![cfg(all(feature = "postgres", feature = "test-util", feature = "axum"))]

mod common;
#[path = "common/contract.rs"]
mod contract;
#[path = "common/postgres.rs"]
mod pg_server;
#[cfg(feature = "redis")]
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use common::siwx::{Runs, buy, signed_header};
use common::*;
use http::StatusCode;
use tower::Layer;
use tower::ServiceExt;
use tower_x402::clock::{Clock, FixedClock};
use tower_x402::idempotency::{MemoryIdempotencyStore, PostgresIdempotencyStore};
use tower_x402::nonce::{
    MemoryNonceStore, NonceStore, PostgresNonceStore, Reservation, StoreError,
};
use tower_x402::prepaid::{Bundle, CreditLedger, Debit, Grant, PostgresCreditLedger, Prepaid};
use tower_x402::proto::X402Version;
use tower_x402::test_util::pay;
use tower_x402::{ChallengeKeys, PaymentLayer};
use tower_x402::{ExactEvmVerifier, Network};

use contract::random_key;
use pg_server::PgServer;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

async fn store(server: &PgServer) -> PostgresNonceStore {
    PostgresNonceStore::connect(&server.url())
        .await
        .expect("connect to the test postgres")
}

/// One query on the store's pool, for inspection.
async fn query(s: &PostgresNonceStore, sql: &str) -> Vec<tokio_postgres::Row> {
    s.pool().get().await.unwrap().query(sql, &[]).await.unwrap()
}

// ------------------------------------------------------------------------------------------------
// The NonceStore contract over every backend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_contract_memory() {
    contract::nonce_store("memory", &MemoryNonceStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_contract_redis() {
    let Some(server) = redis_server::RedisServer::start("nonce_contract_redis") else {
        return;
    };
    let s = tower_x402::nonce::RedisNonceStore::connect(&server.url())
        .await
        .unwrap();
    contract::nonce_store("redis", &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_contract_postgres() {
    let Some(server) = PgServer::start("nonce_contract_postgres") else {
        return;
    };
    contract::nonce_store("postgres", &store(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_contract_memory() {
    contract::idempotency_store("memory", &MemoryIdempotencyStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_contract_redis() {
    let Some(server) = redis_server::RedisServer::start("idempotency_contract_redis") else {
        return;
    };
    let s = tower_x402::idempotency::RedisIdempotencyStore::connect(&server.url())
        .await
        .unwrap();
    contract::idempotency_store("redis", &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_contract_postgres() {
    let Some(server) = PgServer::start("idempotency_contract_postgres") else {
        return;
    };
    let s = PostgresIdempotencyStore::connect(&server.url())
        .await
        .unwrap();
    contract::idempotency_store("postgres", &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credit_ledger_contract_postgres() {
    let Some(server) = PgServer::start("credit_ledger_contract_postgres") else {
        return;
    };
    let l = PostgresCreditLedger::connect(&server.url()).await.unwrap();
    contract::credit_ledger("postgres", Arc::new(l), now()).await;
}

// ------------------------------------------------------------------------------------------------
// PostgreSQL specifics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_versioned_prefixed_and_rows_keep_the_layout() {
    let Some(server) = PgServer::start("schema_is_versioned_prefixed") else {
        return;
    };
    let s = store(&server).await.with_prefix("t1_");
    assert_eq!(s.prefix(), "t1_");
    // Two instances migrating at once: the advisory lock serialises them, one version row.
    let (a, b) = (s.clone().with_prefix("t1_"), s.clone().with_prefix("t1_"));
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    s.migrate().await.unwrap();
    let rows = query(&s, "SELECT component, version FROM t1_migrations").await;
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [("nonce".to_owned(), 1)]);

    let key = random_key();
    let far = now() + 60;
    let Reservation::Reserved(t) = s.reserve(&key, far).await.unwrap() else {
        panic!("first reserve wins")
    };
    s.consume(&key, t).await.unwrap();
    s.consume(&key, t).await.unwrap(); // idempotent for the holder (a retried consume)
    let rows = query(&s, "SELECT k, token, used, expires_ms FROM t1_nonces").await;
    assert_eq!(rows.len(), 1);
    let (k, token, used, expires): (Vec<u8>, Vec<u8>, bool, i64) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
    );
    let mut want = key.chain_id.to_be_bytes().to_vec();
    want.extend_from_slice(key.asset.as_slice());
    want.extend_from_slice(key.from.as_slice());
    want.extend_from_slice(key.nonce.as_slice());
    assert_eq!((k.as_slice(), want.len()), (want.as_slice(), 80));
    assert_eq!(k, PostgresNonceStore::row_key(&key));
    assert_eq!(token, t.0.to_be_bytes());
    assert!(used);
    assert_eq!(
        expires,
        i64::try_from(far * 1000).unwrap(),
        "validBefore in ms"
    );

    // Another prefix: its own tables, independent keys.
    let other = store(&server).await.with_prefix("t2_");
    assert!(matches!(
        other.reserve(&key, far).await.unwrap(),
        Reservation::Reserved(_)
    ));
    assert_eq!(s.reserve(&key, far).await.unwrap(), Reservation::Used);
    assert_eq!(query(&other, "SELECT 1 FROM t2_nonces").await.len(), 1);

    // A prefix that is not a plain identifier is refused before it reaches SQL.
    let pool = s.pool();
    let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        PostgresNonceStore::new(pool).with_prefix("x; DROP TABLE t1_nonces; --")
    }));
    let msg = bad.expect_err("refused");
    let msg = msg.downcast_ref::<String>().map_or("", String::as_str);
    assert!(msg.contains("table prefix"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_across_two_pools_have_one_winner() {
    let Some(server) = PgServer::start("concurrent_reserves_two_pools") else {
        return;
    };
    // Two instances: two pools of 16 connections each.
    let a = store(&server).await;
    let b = store(&server).await;
    a.migrate().await.unwrap();
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
        assert_eq!((winners.len(), in_use), (1, 63), "round {round}");
        // The token is what counts, whichever instance consumes.
        b.consume(&key, winners[0]).await.unwrap();
        assert_eq!(a.reserve(&key, far).await.unwrap(), Reservation::Used);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_postgres_times_out_and_a_lost_reply_stays_blocked() {
    let Some(server) = PgServer::start("stalled_postgres_times_out") else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let s = store(&server)
        .await
        .with_timeout(timeout)
        .with_retry_after(Duration::from_secs(3));
    let far = now() + 60;
    // Warm up: schema made, a connection open with the statement prepared.
    assert!(matches!(
        s.reserve(&random_key(), far).await.unwrap(),
        Reservation::Reserved(_)
    ));

    let key = random_key();
    server.signal_all("-STOP");
    let started = Instant::now();
    let err = s
        .reserve(&key, far)
        .await
        .expect_err("a frozen postgres is unavailable");
    let took = started.elapsed();
    server.signal_all("-CONT");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    // Generous upper bound: this checks the call does not hang, not the machine's speed.
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "deadline kept: {took:?}"
    );
    eprintln!("frozen postgres: Unavailable after {took:?}");

    // PostgreSQL ran the reserve once thawed, but nobody got its token: the proof stays
    // blocked (until validBefore), never free twice. The store serves again. Wait for the
    // thawed statement's row first, so that a loaded machine cannot order our retry before it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let k = PostgresNonceStore::row_key(&key);
    loop {
        let rows = match s.pool().get().await {
            Ok(c) => c
                .query("SELECT 1 FROM x402_nonces WHERE k = $1", &[&&k[..]])
                .await
                .map(|r| r.len())
                .unwrap_or(0),
            Err(_) => 0,
        };
        if rows == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the thawed reserve never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        match s.reserve(&key, far).await {
            Ok(r) => {
                assert_eq!(r, Reservation::InUse);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        s.reserve(&random_key(), far).await.unwrap(),
        Reservation::Reserved(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_cleaned_up() {
    let Some(server) = PgServer::start("expired_rows_are_cleaned_up") else {
        return;
    };
    let s = store(&server)
        .await
        .with_min_ttl(Duration::from_millis(1))
        .with_cleanup_interval(Duration::ZERO);
    // Already expired: held for the minimum TTL only.
    for _ in 0..20 {
        assert!(matches!(
            s.reserve(&random_key(), 0).await.unwrap(),
            Reservation::Reserved(_)
        ));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let live = random_key();
    assert!(matches!(
        s.reserve(&live, now() + 60).await.unwrap(),
        Reservation::Reserved(_)
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = query(&s, "SELECT count(*) FROM x402_nonces").await[0].get::<_, i64>(0);
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} rows left, want only the live one"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.reserve(&live, now() + 60).await.unwrap(),
        Reservation::InUse
    );
}

// ------------------------------------------------------------------------------------------------
// Through the layer

/// A layer on `store`, bound with the deployment's shared key and public origin.
fn instance(store: PostgresNonceStore, hits: &Hits) -> Router {
    let layer = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .resource_base(BASE)
        .bind_challenges(ChallengeKeys::new([0x42; 32]))
        .nonce_store(store)
        .build()
        .expect("layer");
    app(hits).route_layer(layer)
}

/// A fresh proof for `/paid`, signed against the 402 of `svc` (bound id echoed).
async fn fresh_proof(svc: &Router) -> (http::HeaderName, http::HeaderValue) {
    let r = get_with(svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    pay(&payer(), &r.challenge().accepts[0], now(), X402Version::V2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_postgres_run_one_handler_per_proof() {
    let Some(server) = PgServer::start("two_instances_one_postgres") else {
        return;
    };
    let hits = Hits::new();
    // A shared store needs the deployment's challenge key.
    let unkeyed = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .nonce_store(store(&server).await)
        .build();
    assert!(matches!(
        unkeyed,
        Err(tower_x402::error::ConfigError::ChallengeKeyRequired)
    ));
    let a = instance(store(&server).await, &hits);
    let b = instance(store(&server).await, &hits);

    // 64 concurrent copies of one proof over both instances: one run.
    let proof = fresh_proof(&a).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (proof, barrier) = (proof.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let r = svc.oneshot(request("/paid", [proof])).await.unwrap();
                Reply::read(r).await.outcome()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::PAYMENT_REQUIRED, Some(r)) if r == NONCE_USED => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, hits.get()), (1, 1));

    // B's challenge pays at A; the replay at B is refused.
    let p = fresh_proof(&b).await;
    assert_eq!(
        get_with(&a, "/paid", [p.clone()]).await.status,
        StatusCode::OK
    );
    let r = get_with(&b, "/paid", [p]).await;
    assert_eq!(r.reason().as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_is_503_and_restarted_pays_the_same_proof() {
    let Some(mut server) = PgServer::start("postgres_stopped_is_503") else {
        return;
    };
    let hits = Hits::new();
    let s = store(&server)
        .await
        .with_retry_after(Duration::from_secs(2));
    let svc = instance(s, &hits);
    let p = fresh_proof(&svc).await;
    assert_eq!(get_with(&svc, "/paid", [p]).await.status, StatusCode::OK);
    assert_eq!(hits.get(), 1);

    let proof = fresh_proof(&svc).await;
    server.stop();
    for i in 0..3 {
        let started = Instant::now();
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "attempt {i}");
        assert_eq!(r.header("retry-after"), Some("2"));
        assert!(took < Duration::from_secs(2), "failed fast ({took:?})");
        eprintln!("postgres down, request {i}: 503 in {took:?}");
    }
    assert_eq!(
        hits.get(),
        1,
        "the handler did not run while postgres was down"
    );

    // Back on the same port: the same store, the same proof (never claimed) pays.
    server.restart();
    let restarted = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let r = get_with(&svc, "/paid", [proof.clone()]).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 503 while reconnecting"
        );
        assert!(r.header("retry-after").is_some());
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no recovery within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "postgres restarted: 200 after {attempts} request(s), {:?}",
        restarted.elapsed()
    );
    assert_eq!(hits.get(), 2);
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(r.reason().as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 2);

    // A store pointed at a closed port: Unavailable within its bound.
    let closed = format!("postgres://postgres@127.0.0.1:{}/postgres", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let started = Instant::now();
    let err = PostgresNonceStore::connect(&closed)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, StoreError::Unavailable { .. }) && err.is_retryable());
    assert!(started.elapsed() <= PostgresNonceStore::CONNECT_TIMEOUT + Duration::from_millis(500));
}

/// A layer with both PostgreSQL stores on one pool (bound challenges, as `instance`).
async fn instance_with_ids(server: &PgServer, hits: &Hits) -> Router {
    let nonces = store(server).await;
    let ids = PostgresIdempotencyStore::new(nonces.pool());
    let layer = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .resource_base(BASE)
        .bind_challenges(ChallengeKeys::new([0x42; 32]))
        .nonce_store(nonces)
        .idempotency(ids)
        .build()
        .expect("layer");
    app(hits).route_layer(layer)
}

/// A proof for `/paid` signed against the 402 of `svc`, carrying payment id `id`.
async fn proof_with_id(svc: &Router, id: &str) -> (http::HeaderName, http::HeaderValue) {
    use tower_x402::test_util::{encode, exact_payload, v2_json};
    let r = get_with(svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let req = r.challenge().accepts[0].clone();
    let payload = exact_payload(&payer(), &req, now());
    let mut json = v2_json(&req, &payload, None);
    json["extensions"] =
        serde_json::json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
    (tower_x402::proto::header::PAYMENT_SIGNATURE, encode(&json))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_postgres_replay_the_stored_response() {
    let Some(mut server) = PgServer::start("two_instances_replay_stored") else {
        return;
    };
    let hits = Hits::gated();
    let a = instance_with_ids(&server, &hits).await;
    let b = instance_with_ids(&server, &hits).await;

    // 64 copies of one proof with one id over both instances, the first run held at the gate.
    let id = "pay_0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let proof = proof_with_id(&a, id).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let proof = proof.clone();
            tokio::spawn(async move {
                let r = svc.oneshot(request("/paid", [proof])).await.unwrap();
                Reply::read(r).await
            })
        })
        .collect();
    let started = Instant::now();
    while hits.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no handler run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    hits.open();
    let mut ok = Vec::new();
    let mut in_progress = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.outcome() {
            (StatusCode::OK, _) => ok.push(r),
            (StatusCode::SERVICE_UNAVAILABLE, Some(reason)) if reason == "payment_in_progress" => {
                in_progress += 1
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    eprintln!(
        "64 duplicates over two instances: {} x 200, {in_progress} x 503",
        ok.len()
    );
    assert_eq!(hits.get(), 1, "exactly one handler run");
    assert_eq!(ok.len() + in_progress, 64);

    // A retry on either instance gets the stored response, receipt included.
    let first = get_with(&a, "/paid", [proof.clone()]).await;
    assert_eq!(first.status, StatusCode::OK);
    let receipt = first
        .header("payment-response")
        .expect("receipt")
        .to_owned();
    for svc in [&a, &b] {
        let r = get_with(svc, "/paid", [proof.clone()]).await;
        assert_eq!((r.status, &r.body), (StatusCode::OK, &first.body));
        assert_eq!(r.header("payment-response"), Some(receipt.as_str()));
    }
    for r in &ok {
        assert_eq!(r.body, first.body);
    }
    assert_eq!(hits.get(), 1);

    // Another proof with the same id: 409 on either instance.
    let other = proof_with_id(&b, id).await;
    let r = get_with(&b, "/paid", [other]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::CONFLICT,
            Some("payment_identifier_conflict".to_owned())
        )
    );

    // PostgreSQL down: 503 + Retry-After before the handler.
    let p = proof_with_id(&a, "pay_while_postgres_is_down_01").await;
    server.stop();
    let r = get_with(&a, "/paid", [p]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Prepaid credit in PostgreSQL

async fn credit(server: &PgServer, prefix: &str) -> PostgresCreditLedger {
    PostgresCreditLedger::connect(&server.url())
        .await
        .expect("connect to the test postgres")
        .with_prefix(prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credit_rows_keep_the_layout_and_dead_credit_is_deleted_after_the_retention() {
    let Some(server) = PgServer::start("credit_rows_keep_the_layout") else {
        return;
    };
    // The default retention (1 day) while the rows are inspected: a clean-up started by these
    // grants deletes nothing yet.
    let l = credit(&server, "c1_").await;
    l.migrate().await.unwrap();
    let client = l.pool().get().await.unwrap();
    let rows = client
        .query("SELECT component, version FROM c1_migrations", &[])
        .await
        .unwrap();
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [("credit".to_owned(), 1)]);

    let t = now();
    let (spent, dead, live) = (
        contract::random_payer(),
        contract::random_payer(),
        contract::random_payer(),
    );
    l.grant(
        spent,
        Grant {
            calls: Some(1),
            expires_at: None,
        },
        t,
    )
    .await
    .unwrap();
    assert_eq!(
        l.debit(spent, t).await.unwrap(),
        Debit::Debited { remaining: Some(0) }
    );
    l.grant(
        dead,
        Grant {
            calls: None,
            expires_at: Some(t - 10),
        },
        t,
    )
    .await
    .unwrap();
    let row = client
        .query_one(
            "SELECT calls, expires_at FROM c1_credits WHERE payer = $1",
            &[&dead.as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)),
        (None, Some(i64::try_from(t - 10).unwrap())),
        "a window: no count, its end in Unix seconds"
    );
    // Caps: counts and times past 2^52 are stored at the cap, as in Redis.
    l.grant(
        live,
        Grant {
            calls: Some(u64::MAX),
            expires_at: Some(u64::MAX),
        },
        t,
    )
    .await
    .unwrap();
    l.grant(
        live,
        Grant {
            calls: Some(u64::MAX),
            expires_at: None,
        },
        t,
    )
    .await
    .unwrap();
    let row = client
        .query_one(
            "SELECT calls, expires_at FROM c1_credits WHERE payer = $1",
            &[&live.as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<i64>>(0),
        Some((1 << 53) - 1),
        "capped as in Redis, never overflowed"
    );
    assert_eq!(row.get::<_, Option<i64>>(1), None, "no time limit absorbs");

    // A 1 ms retention and no interval: the next grant starts a clean-up; spent and expired
    // rows go, live stays.
    let l = l
        .with_retention(Duration::from_millis(1))
        .with_cleanup_interval(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(20)).await;
    l.grant(
        live,
        Grant {
            calls: Some(1),
            expires_at: None,
        },
        t,
    )
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        let payers: Vec<Vec<u8>> = client
            .query("SELECT payer FROM c1_credits", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if payers == [live.to_vec()] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not cleaned up: {payers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another prefix is another ledger.
    let other = credit(&server, "c2_").await;
    assert_eq!(other.debit(live, t).await.unwrap(), Debit::Exhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_debits_across_two_pools_never_overdraw() {
    let Some(server) = PgServer::start("concurrent_debits_across_two_pools") else {
        return;
    };
    let ledgers = [
        Arc::new(credit(&server, "race_").await),
        Arc::new(credit(&server, "race_").await),
    ];
    let t = now();
    let payer = contract::random_payer();
    ledgers[0]
        .grant(
            payer,
            Grant {
                calls: Some(10),
                expires_at: None,
            },
            t,
        )
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let l = ledgers[i % 2].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                l.debit(payer, t).await.unwrap()
            })
        })
        .collect();
    let mut remaining = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Debit::Debited { remaining: Some(n) } => remaining.push(n),
            Debit::Exhausted => {}
            other => panic!("{other:?}"),
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..10).collect::<Vec<u64>>(),
        "10 calls, each taken once"
    );
}

/// A layer selling a 10-call bundle, its nonces and credit in `server` (one pool for both).
async fn prepaid_instance(server: &PgServer, clock: &FixedClock) -> PaymentLayer {
    // Both stores on one server, both saying Retry-After: 3 when it is down.
    let nonces = store(server).await.with_retry_after(Duration::from_secs(3));
    let ledger = PostgresCreditLedger::new(nonces.pool())
        .with_prefix("bundle_")
        .with_retry_after(Duration::from_secs(3));
    PaymentLayer::builder()
        // `buy` signs a requirement it builds itself, as in tests/prepaid_redis.rs.
        .no_challenge_binding()
        .pay_to(PAY_TO)
        .network(Network::BASE_SEPOLIA)
        .verifier(ExactEvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(nonces)
        .resource_base(BASE)
        .prepaid(
            Prepaid::new(Bundle::calls(10).for_price("$0.01"))
                .ledger(ledger)
                .clock(clock.clone())
                .nonce_key([0x5a; 32]),
        )
        .build()
        .expect("layer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_postgres_serve_a_ten_call_bundle_ten_times() {
    let Some(server) = PgServer::start("two_instances_one_postgres_bundle") else {
        return;
    };
    let clock = FixedClock::new(now());
    let runs = Runs::default();
    let a = prepaid_instance(&server, &clock)
        .await
        .layer(runs.service());
    let b = prepaid_instance(&server, &clock)
        .await
        .layer(runs.service());
    buy(&a, clock.now()).await;
    assert_eq!(runs.get(), 1, "the purchase is served");

    // 64 sign-ins, each over its own nonce, issued by A or B and sent to A or B.
    let svcs = [a.clone(), b.clone()];
    let mut calls = Vec::new();
    for i in 0..64 {
        calls.push(((i / 2) % 2, signed_header(&svcs[i % 2], &payer()).await));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(calls.len()));
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|(to, h)| {
            let svc = svcs[to].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                get_with(&svc, "/paid", [h]).await
            })
        })
        .collect();
    let (mut remaining, mut refused) = (Vec::new(), 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => remaining.push(r.json()["remaining"].as_u64().unwrap()),
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(r.reason().as_deref(), Some("prepaid_credit_exhausted"));
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..9).collect::<Vec<u64>>(),
        "each served call took one"
    );
    assert_eq!(refused, 55);
    assert_eq!(runs.get(), 10, "1 paid + 9 signed-in handler runs in total");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_postgres_stopped_is_503_and_the_credit_survives_the_restart() {
    let Some(mut server) = PgServer::start("ledger_postgres_stopped") else {
        return;
    };
    let clock = FixedClock::new(now());
    let runs = Runs::default();
    let svc = prepaid_instance(&server, &clock)
        .await
        .layer(runs.service());
    buy(&svc, clock.now()).await;
    let ok = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(ok.json()["remaining"], serde_json::json!(8));
    assert_eq!(runs.get(), 2);

    let header = signed_header(&svc, &payer()).await;
    server.stop();
    for i in 0..2 {
        let started = Instant::now();
        let r = get_with(&svc, "/paid", [header.clone()]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "attempt {i}");
        assert_eq!(
            r.header("retry-after"),
            Some("3"),
            "the stores' Retry-After"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "failed fast");
    }
    assert_eq!(
        runs.get(),
        2,
        "the handler did not run while postgres was down"
    );

    // Back on the same port: the same layer reconnects, and (unlike Redis without
    // persistence) the credit is still there. The sign-in refused meanwhile was not spent.
    server.restart();
    let restarted = Instant::now();
    loop {
        let r = get_with(&svc, "/paid", [header.clone()]).await;
        if r.status == StatusCode::OK {
            assert_eq!(
                r.json()["remaining"],
                serde_json::json!(7),
                "durable credit"
            );
            break;
        }
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 503 while reconnecting"
        );
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no recovery in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.get(), 3);
}
