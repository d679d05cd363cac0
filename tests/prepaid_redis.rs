//! Prepaid credit shared in Redis (issue #10): `RedisCreditLedger` against a real
//! `redis-server`, and two `PaymentLayer` instances selling one bundle.
//!
//! * One test body, `credit_ledger` in `tests/common/contract.rs`, runs against
//!   `MemoryCreditLedger` and `RedisCreditLedger` here and `PostgresCreditLedger` in
//!   `tests/postgres.rs`, so the three cannot drift.
//! * The Redis specifics: key layout, key expiry, caps, corrupt entries, fail closed.
//! * Two instances sharing one Redis (nonce store and ledger, same nonce key): a 10-call
//!   bundle bought through one serves exactly 9 of 64 concurrent sign-ins spread over both.
//! * The ledger's Redis down: a sign-in gets 503 with `Retry-After` and the handler does not run.
//!
//! Redis servers come from `tests/common/redis_server.rs` (fails under `CI=true` when
//! `redis-server` is missing). Handler runs are counted, not only statuses.
#![cfg(all(feature = "redis", feature = "test-util"))]

mod common;
#[path = "common/contract.rs"]
mod contract;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::siwx::{Runs, buy, declaration, signed_header};
use common::*;
use http::StatusCode;
use redis::AsyncCommands;
use serde_json::json;
use tower::Layer;
use tower_x402::clock::{Clock, FixedClock};
use tower_x402::nonce::{RedisNonceStore, StoreError};
use tower_x402::prepaid::{
    Bundle, CreditLedger, Debit, Grant, MemoryCreditLedger, Prepaid, RedisCreditLedger,
};
use tower_x402::primitives::Address;
use tower_x402::{ExactEvmVerifier, Network, PaymentLayer};

use redis_server::RedisServer;

/// The nonce key every instance of a deployment shares.
const NONCE_KEY: [u8; 32] = [0x5a; 32];
/// Largest count and millisecond the Redis ledger keeps (2^53 - 1).
const CAP: u64 = (1 << 53) - 1;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn grant(calls: Option<u64>, expires_at: Option<u64>) -> Grant {
    Grant { calls, expires_at }
}

fn debited(remaining: Option<u64>) -> Debit {
    Debit::Debited { remaining }
}

async fn ledger(server: &RedisServer, prefix: &str) -> RedisCreditLedger {
    RedisCreditLedger::connect(&server.url())
        .await
        .expect("connect to the test redis")
        .with_prefix(prefix)
}

/// A plain connection to inspect keys.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

// ------------------------------------------------------------------------------------------------
// One contract, both ledgers

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_ledger_keeps_the_contract() {
    contract::credit_ledger("memory", Arc::new(MemoryCreditLedger::new()), now()).await;
    contract::credit_ledger("memory", Arc::new(MemoryCreditLedger::new()), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_ledger_keeps_the_contract() {
    let Some(server) = RedisServer::start("redis_ledger_keeps_the_contract") else {
        return;
    };
    contract::credit_ledger("redis", Arc::new(ledger(&server, "contract:").await), now()).await;
}

// ------------------------------------------------------------------------------------------------
// Redis specifics

#[tokio::test]
async fn redis_ledger_key_layout_expiry_caps_and_corruption() {
    let Some(server) = RedisServer::start("redis_ledger_key_layout_expiry_caps_and_corruption")
    else {
        return;
    };
    let keep = Duration::from_millis(300);
    let l = ledger(&server, "k:").await.with_retention(keep);
    let mut r = raw(&server).await;
    let t = now();
    let conn = r.clone();
    let pexpiretime = move |key: String| {
        let mut r = conn.clone();
        async move {
            redis::cmd("PEXPIRETIME")
                .arg(key)
                .query_async::<i64>(&mut r)
                .await
                .unwrap()
        }
    };

    // Layout: prefix + 40 hex digits; `<calls>:<expires_at>`; no key expiry for live counted
    // credit without a time limit.
    let a = Address::repeat_byte(0xab);
    assert_eq!(l.redis_key(a), format!("k:{}", "ab".repeat(20)));
    l.grant(a, grant(Some(9), None), t).await.unwrap();
    let v: String = r.get(l.redis_key(a)).await.unwrap();
    assert_eq!(v, "9:");
    assert_eq!(pexpiretime(l.redis_key(a)).await, -1, "no expiry");

    // A window: the key lives until expires_at plus the retention.
    let w = Address::repeat_byte(0x01);
    l.grant(w, grant(None, Some(t + 60)), t).await.unwrap();
    let v: String = r.get(l.redis_key(w)).await.unwrap();
    assert_eq!(v, format!(":{}", t + 60));
    let at = i64::try_from((t + 60) * 1000 + 300).unwrap();
    assert_eq!(pexpiretime(l.redis_key(w)).await, at);
    // A top-up with a later expiry moves it; an earlier one does not.
    l.grant(w, grant(None, Some(t + 90)), t).await.unwrap();
    l.grant(w, grant(None, Some(t + 30)), t).await.unwrap();
    let at = i64::try_from((t + 90) * 1000 + 300).unwrap();
    assert_eq!(pexpiretime(l.redis_key(w)).await, at);
    // "No time limit" absorbs the window: the key expiry goes too.
    l.grant(w, grant(Some(1), None), t).await.unwrap();
    assert_eq!(pexpiretime(l.redis_key(w)).await, -1);

    // Spent counted credit is kept for the retention (a refund of the last call finds it),
    // then forgotten.
    let s = Address::repeat_byte(0x02);
    l.grant(s, grant(Some(1), None), t).await.unwrap();
    assert_eq!(l.debit(s, t).await.unwrap(), debited(Some(0)));
    let pttl: i64 = r.pttl(l.redis_key(s)).await.unwrap();
    assert!(pttl > 0 && pttl <= 300, "spent: pttl {pttl}");
    l.refund(s).await.unwrap();
    let pttl: i64 = r.pttl(l.redis_key(s)).await.unwrap();
    assert_eq!(pttl, -1, "refunded: live again, no expiry");
    assert_eq!(l.debit(s, t).await.unwrap(), debited(Some(0)));
    tokio::time::sleep(keep + Duration::from_millis(100)).await;
    let exists: bool = r.exists(l.redis_key(s)).await.unwrap();
    assert!(!exists, "spent credit forgotten after the retention");
    assert_eq!(l.debit(s, t).await.unwrap(), Debit::Exhausted);

    // Credit past expires_at + retention is forgotten at once: exhausted, not expired.
    let x = Address::repeat_byte(0x03);
    l.grant(x, grant(Some(5), Some(t - 1)), t - 10)
        .await
        .unwrap();
    let exists: bool = r.exists(l.redis_key(x)).await.unwrap();
    assert!(!exists, "dead on arrival");
    assert_eq!(l.debit(x, t).await.unwrap(), Debit::Exhausted);

    // Caps keep the scripts' arithmetic exact: 2^53 - 1 calls, 2^53 - 1 ms.
    let big = Address::repeat_byte(0x04);
    l.grant(big, grant(Some(u64::MAX), Some(u64::MAX)), t)
        .await
        .unwrap();
    l.grant(big, grant(Some(u64::MAX), Some(u64::MAX)), t)
        .await
        .unwrap();
    let v: String = r.get(l.redis_key(big)).await.unwrap();
    assert_eq!(v, format!("{CAP}:{}", CAP / 1000));
    let at = i64::try_from(CAP / 1000 * 1000 + 300).unwrap();
    assert_eq!(pexpiretime(l.redis_key(big)).await, at);
    assert_eq!(l.debit(big, t).await.unwrap(), debited(Some(CAP - 1)));
    l.refund(big).await.unwrap();
    l.refund(big).await.unwrap();
    let v: String = r.get(l.redis_key(big)).await.unwrap();
    assert_eq!(v, format!("{CAP}:{}", CAP / 1000), "a refund saturates");

    // Another prefix is another ledger.
    let other = ledger(&server, "k2:").await;
    assert_eq!(other.debit(a, t).await.unwrap(), Debit::Exhausted);

    // Anything but an entry under the key fails closed, and is left alone.
    for junk in ["garbage", "1:2:3", "-1:", "12345678901234567:", ":x"] {
        let bad = Address::repeat_byte(0x05);
        let _: () = r.set(l.redis_key(bad), junk).await.unwrap();
        let results = [
            l.debit(bad, t).await.err(),
            l.grant(bad, grant(Some(1), None), t).await.err(),
            l.refund(bad).await.err(),
        ];
        for e in results {
            assert!(
                matches!(e, Some(StoreError::Unavailable { .. })),
                "{junk:?}: {e:?}"
            );
        }
        let v: String = r.get(l.redis_key(bad)).await.unwrap();
        assert_eq!(v, junk);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_debits_across_two_ledgers_never_overdraw() {
    let Some(server) = RedisServer::start("concurrent_debits_across_two_ledgers_never_overdraw")
    else {
        return;
    };
    // Two instances: two connection managers, one prefix.
    let ledgers = [
        ledger(&server, "race:").await,
        ledger(&server, "race:").await,
    ];
    let t = now();
    for round in 0..8u8 {
        let payer = Address::repeat_byte(round);
        ledgers[0]
            .grant(payer, grant(Some(20), None), t)
            .await
            .unwrap();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let l = ledgers[i % 2].clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let d = l.debit(payer, t).await.unwrap();
                    // Some calls fail and give theirs back, as a failing handler does.
                    if i % 8 == 0 && d != Debit::Exhausted {
                        l.refund(payer).await.unwrap();
                        return (i % 2, None);
                    }
                    (i % 2, Some(d))
                })
            })
            .collect();
        let mut remaining = Vec::new();
        let mut per_ledger = [0; 2];
        for task in tasks {
            match task.await.unwrap() {
                (via, Some(Debit::Debited { remaining: Some(n) })) => {
                    remaining.push(n);
                    per_ledger[via] += 1;
                }
                (_, Some(Debit::Exhausted) | None) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        // Kept debits and refunds interleave, so the values seen are not 0..20; but never
        // more kept calls than granted, and none left unless a refund came after the rest.
        assert!(remaining.len() <= 20, "round {round}: {remaining:?}");
        let left = match ledgers[1].debit(payer, t).await.unwrap() {
            Debit::Debited { remaining: Some(n) } => n + 1,
            Debit::Exhausted => 0,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            remaining.len() as u64 + left,
            20,
            "round {round}: kept calls + left = granted ({per_ledger:?})"
        );
    }
}

#[test]
fn redis_ledger_unreachable_fails_closed_fast_and_debug_hides_the_password() {
    // Needs no server: a lazy manager on a port nothing listens on.
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
        let l = RedisCreditLedger::new(conn)
            .with_timeout(Duration::from_millis(200))
            .with_retry_after(Duration::from_secs(4));
        let dbg = format!("{l:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
        assert_eq!(
            l.redis_key(Address::ZERO),
            format!("x402:credit:{}", "0".repeat(40))
        );
        let started = Instant::now();
        let e = l.debit(Address::ZERO, now()).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { .. }) && e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(4)));
        assert!(
            l.grant(Address::ZERO, grant(Some(1), None), 0)
                .await
                .is_err()
        );
        assert!(l.refund(Address::ZERO).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    });
}

// ------------------------------------------------------------------------------------------------
// Two instances, one Redis

/// One instance ("server") selling a 10-call bundle for `$0.01`: its own connections to
/// `nonces_at` and `credit_at`, the deployment's nonce key, clock and credit prefix.
async fn instance(
    nonces_at: &RedisServer,
    credit: RedisCreditLedger,
    clock: &FixedClock,
) -> PaymentLayer {
    let nonces = RedisNonceStore::connect(&nonces_at.url())
        .await
        .expect("connect to the test redis");
    PaymentLayer::builder()
        .no_challenge_binding()
        .pay_to(PAY_TO)
        .network(Network::BASE_SEPOLIA)
        .verifier(ExactEvmVerifier::new().with_clock(clock.clone()))
        .nonce_store(nonces)
        .resource_base(BASE)
        .prepaid(
            Prepaid::new(Bundle::calls(10).for_price("$0.01"))
                .ledger(credit)
                .clock(clock.clone())
                .nonce_key(NONCE_KEY),
        )
        .build()
        .expect("layer")
}

#[tokio::test]
async fn a_shared_ledger_without_keys_does_not_build() {
    let Some(server) = RedisServer::start("a_shared_ledger_without_keys_does_not_build") else {
        return;
    };
    let build = |nonce_key: Option<[u8; 32]>, ledger: RedisCreditLedger| {
        let mut prepaid = Prepaid::new(Bundle::calls(10).for_price("$0.01")).ledger(ledger);
        if let Some(key) = nonce_key {
            prepaid = prepaid.nonce_key(key);
        }
        PaymentLayer::builder()
            .pay_to(PAY_TO)
            .network(Network::BASE_SEPOLIA)
            .resource_base(BASE)
            .prepaid(prepaid)
            .build()
            .map(|_| ())
    };
    // Sign-in nonces made with a key of this process would fail on every other instance.
    let err = build(None, ledger(&server, "keys:").await).unwrap_err();
    assert!(
        matches!(
            err,
            tower_x402::error::ConfigError::Prepaid(
                tower_x402::prepaid::BundleError::NonceKeyRequired
            )
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nonce_key"), "{err}");
    // So would challenge ids.
    let err = build(Some(NONCE_KEY), ledger(&server, "keys:").await).unwrap_err();
    assert!(
        matches!(err, tower_x402::error::ConfigError::ChallengeKeyRequired),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_redis_serve_a_ten_call_bundle_ten_times() {
    let Some(server) =
        RedisServer::start("two_instances_one_redis_serve_a_ten_call_bundle_ten_times")
    else {
        return;
    };
    // Real time: Redis expires nonce keys by its own clock.
    let clock = FixedClock::new(now());
    let runs = Runs::default();
    let a = instance(&server, ledger(&server, "bundle:").await, &clock)
        .await
        .layer(runs.service());
    let b = instance(&server, ledger(&server, "bundle:").await, &clock)
        .await
        .layer(runs.service());

    // Not bought yet: a valid sign-in on B gets 402.
    let early = get_with(&b, "/paid", [signed_header(&b, &payer()).await]).await;
    assert_eq!(
        early.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("prepaid_credit_exhausted".into())
        )
    );
    buy(&a, clock.now()).await;
    assert_eq!(runs.get(), 1, "the purchase is served");

    // 64 messages, each over its own nonce; issued by A or B and sent to A or B in all four
    // combinations (the shared nonce key makes either accept the other's).
    let svcs = [a.clone(), b.clone()];
    let mut calls = Vec::new();
    for i in 0..64 {
        let h = signed_header(&svcs[i % 2], &payer()).await;
        calls.push(((i / 2) % 2, h));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(calls.len()));
    let started = Instant::now();
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|(to, h)| {
            let svc = svcs[to].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                (to, get_with(&svc, "/paid", [h]).await)
            })
        })
        .collect();
    let mut remaining = Vec::new();
    let mut served_by = [0; 2];
    let mut refused = 0;
    for t in tasks {
        let (to, r) = t.await.unwrap();
        match r.status {
            StatusCode::OK => {
                assert!(r.has_no_receipt(), "a sign-in settles nothing");
                assert_eq!(r.json()["paid"], json!(false));
                assert_eq!(
                    r.json()["signedIn"],
                    json!(payer().address().to_checksum(None))
                );
                remaining.push(r.json()["remaining"].as_u64().unwrap());
                served_by[to] += 1;
            }
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(r.reason().as_deref(), Some("prepaid_credit_exhausted"));
                assert!(
                    declaration(&r)["info"]["nonce"].is_string(),
                    "a fresh challenge"
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    eprintln!(
        "64 concurrent sign-ins over two instances: {:?}; served by A {}, by B {}",
        started.elapsed(),
        served_by[0],
        served_by[1]
    );
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..9).collect::<Vec<u64>>(),
        "each served call took one"
    );
    assert_eq!(refused, 55);
    assert_eq!(runs.get(), 10, "1 paid + 9 signed-in handler runs in total");
    let left: String = raw(&server)
        .await
        .get(
            ledger(&server, "bundle:")
                .await
                .redis_key(payer().address()),
        )
        .await
        .unwrap();
    assert_eq!(left, "0:", "the ledger ends at zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_redis_down_sign_in_is_503_and_the_handler_does_not_run() {
    let Some(nonces) = RedisServer::start("ledger_redis_down (nonces)") else {
        return;
    };
    let Some(mut credit) = RedisServer::start("ledger_redis_down (credit)") else {
        return;
    };
    // Nonces and credit on two servers: only the ledger's goes down, so the 503 is its own.
    let clock = FixedClock::new(now());
    let runs = Runs::default();
    let l = ledger(&credit, "down:")
        .await
        .with_retry_after(Duration::from_secs(3));
    let svc = instance(&nonces, l, &clock).await.layer(runs.service());
    buy(&svc, clock.now()).await;
    let ok = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(ok.json()["remaining"], json!(8));
    assert_eq!(runs.get(), 2);

    credit.stop();
    for i in 0..2 {
        let started = Instant::now();
        let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
        assert_eq!(
            r.outcome(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("service_unavailable".into())
            ),
            "attempt {i}"
        );
        assert_eq!(
            r.header("retry-after"),
            Some("3"),
            "the ledger's Retry-After"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "failed fast");
    }
    assert_eq!(
        runs.get(),
        2,
        "the handler did not run while the ledger was down"
    );
    // A purchase meanwhile: the money moved, so that call is served; the ledger cannot take
    // the grant, which is kept owed in memory and raised as an alert.
    let grants_lost = tower_x402::alert::count(tower_x402::alert::Alert::CreditGrant);
    buy(&svc, clock.now()).await;
    assert_eq!(runs.get(), 3);
    assert!(tower_x402::alert::count(tower_x402::alert::Alert::CreditGrant) > grants_lost);

    // Back (empty: no persistence), the same layer reconnects. The credit from before the
    // outage was lost with the data, but the bundle bought during it is credited at the
    // payer's next sign-in: 9 calls, this one taken.
    credit.restart();
    let restarted = Instant::now();
    loop {
        let r = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
        if r.status == StatusCode::OK {
            assert_eq!(r.json()["remaining"], json!(8), "the owed bundle");
            break;
        }
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 503 while reconnecting"
        );
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no recovery in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs.get(), 4);
    let ok = get_with(&svc, "/paid", [signed_header(&svc, &payer()).await]).await;
    assert_eq!(ok.json()["remaining"], json!(7), "owed once, not twice");
    assert_eq!(runs.get(), 5);
}
