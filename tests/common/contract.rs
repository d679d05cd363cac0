//! The contracts every store of a trait must keep, one function per trait, run against each
//! backend (memory, Redis, PostgreSQL) by `tests/postgres.rs`.
//!
//! Included with `#[path = "common/contract.rs"] mod contract;`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tower_x402::idempotency::{
    Begin, Fingerprint, IdempotencyKey, IdempotencyStore, PaymentId, StoredResponse,
};
use tower_x402::nonce::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
use tower_x402::prepaid::{CreditLedger, Debit, Grant};
use tower_x402::primitives::{Address, B256, address};
use tower_x402::test_util::random_nonce;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A key no other test uses.
pub fn random_key() -> NonceKey {
    NonceKey {
        chain_id: 84532,
        asset: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        from: Address::repeat_byte(0x11),
        nonce: random_nonce(),
    }
}

fn not_held<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(matches!(r, Err(StoreError::NotHeld)), "{what}: {r:?}");
}

/// The [`NonceStore`] contract (`backend` names the store in failures): one winner, in use
/// while held, a stranger's token changes nothing, release frees, consume makes it used until
/// it expires, an expired claim is free again and its old token dead. Takes ~2 s (expiry is
/// in whole seconds).
pub async fn nonce_store<S: NonceStore>(backend: &str, s: &S) {
    let far = now() + 60;
    let key = random_key();
    let Reservation::Reserved(t) = s.reserve(&key, far).await.unwrap() else {
        panic!("{backend}: the first reserve wins")
    };
    assert_eq!(
        s.reserve(&key, far).await.unwrap(),
        Reservation::InUse,
        "{backend}"
    );
    let stranger = ClaimToken(t.0 ^ 1);
    not_held(s.release(&key, stranger).await, backend);
    not_held(s.consume(&key, stranger).await, backend);
    assert_eq!(
        s.reserve(&key, far).await.unwrap(),
        Reservation::InUse,
        "{backend}: a stranger changed nothing"
    );

    // Release gives it back; the old token is dead.
    s.release(&key, t).await.unwrap();
    let Reservation::Reserved(t2) = s.reserve(&key, far).await.unwrap() else {
        panic!("{backend}: a released key is free again")
    };
    not_held(s.release(&key, t).await, backend);
    not_held(s.consume(&key, t).await, backend);

    // Consume: used, for everyone, and no longer releasable.
    s.consume(&key, t2).await.unwrap();
    assert_eq!(
        s.reserve(&key, far).await.unwrap(),
        Reservation::Used,
        "{backend}"
    );
    not_held(s.release(&key, t2).await, backend);
    assert_eq!(
        s.reserve(&key, far).await.unwrap(),
        Reservation::Used,
        "{backend}"
    );
    not_held(s.release(&random_key(), t2).await, backend);
    not_held(s.consume(&random_key(), t2).await, backend);

    // Expiry: a claim until `now + 1` (whole seconds) is free once that second has passed,
    // used or not; the old holder's token no longer works.
    let (reserved, used) = (random_key(), random_key());
    let soon = now() + 1;
    let Reservation::Reserved(old) = s.reserve(&reserved, soon).await.unwrap() else {
        panic!("{backend}: reserve")
    };
    let Reservation::Reserved(spent) = s.reserve(&used, soon).await.unwrap() else {
        panic!("{backend}: reserve")
    };
    s.consume(&used, spent).await.unwrap();
    assert_eq!(
        s.reserve(&used, soon).await.unwrap(),
        Reservation::Used,
        "{backend}"
    );
    while now() <= soon {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for k in [reserved, used] {
        let Reservation::Reserved(fresh) = s.reserve(&k, now() + 60).await.unwrap() else {
            panic!("{backend}: an expired claim is free again")
        };
        not_held(s.release(&k, old).await, backend);
        not_held(s.consume(&k, spent).await, backend);
        s.consume(&k, fresh).await.unwrap();
    }
}

/// A verified `exact` payment of `amount` from `from`, with a fresh nonce.
#[cfg(feature = "deferred")]
pub fn queued_payment(from: Address, amount: u64) -> tower_x402::VerifiedPayment {
    use tower_x402::primitives::{Bytes, U256};
    tower_x402::VerifiedPayment::exact(
        tower_x402::proto::X402Version::V2,
        tower_x402::Network::BASE_SEPOLIA,
        address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        tower_x402::proto::exact::Authorization {
            from,
            to: Address::repeat_byte(0x33),
            value: U256::from(amount),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX / 2),
            nonce: random_nonce(),
        },
        Bytes::from(vec![7; 65]),
    )
}

/// The [`SettlementQueue`](tower_x402::settle::deferred::SettlementQueue) contract, on an
/// empty queue: one row per authorization, the pre-check's exposure, leases that never share
/// a payment (full batch at once, else the ripe ones), `sent` refused without the lease,
/// renew/release, a final outcome recorded once, and an expired lease taken over with
/// `recovered` set and its `sent` hashes. Takes ~0.5 s (one lease expires).
#[cfg(feature = "deferred")]
pub async fn settlement_queue<Q: tower_x402::settle::deferred::SettlementQueue>(
    backend: &str,
    q: &Q,
) {
    use tower_x402::primitives::U256;
    use tower_x402::settle::deferred::{Appended, Final, LeaseOwner, LeaseRequest};

    let ms = |s: u64| s * 1000;
    let ttl = Duration::from_secs(30);
    let (a, b, c) = (LeaseOwner(1), LeaseOwner(2), LeaseOwner(3));
    assert_eq!(q.pending().await.unwrap(), 0, "{backend}: empty");
    let payer = Address::repeat_byte(0x44);
    let old = queued_payment(payer, 1_000);
    let young = queued_payment(payer, 2_000);
    let Appended::Accepted(id_old) = q.append(&old, ms(1)).await.unwrap() else {
        panic!("{backend}: the first append is accepted")
    };
    assert_eq!(
        q.append(&old, ms(2)).await.unwrap(),
        Appended::Duplicate,
        "{backend}: one row per authorization"
    );
    let Appended::Accepted(id_young) = q.append(&young, ms(now())).await.unwrap() else {
        panic!("{backend}: accepted")
    };
    assert_ne!(id_old, id_young);
    let e = q.exposure(&young).await.unwrap();
    assert_eq!(
        (e.pending, e.owed, e.queued),
        (2, U256::from(3_000), true),
        "{backend}"
    );
    let stranger = queued_payment(Address::repeat_byte(0x45), 5);
    let e = q.exposure(&stranger).await.unwrap();
    assert_eq!((e.owed, e.queued), (U256::ZERO, false), "{backend}");

    // Not a full batch: only the ripe one (accepted at or before `ripe_ms`).
    let got = q.lease(LeaseRequest::new(a, 10, ttl, ms(5))).await.unwrap();
    assert_eq!(got.len(), 1, "{backend}: the ripe one only");
    assert_eq!(got[0].id, id_old);
    assert_eq!(got[0].payment.nonce(), old.nonce());
    assert_eq!(got[0].payment.amount, old.amount);
    assert_eq!(got[0].accepted_ms, ms(1));
    assert!(!got[0].recovered && got[0].sent.is_empty() && got[0].attempts == 0);
    // A full batch (max 1) goes though young.
    let got = q.lease(LeaseRequest::new(b, 1, ttl, 0)).await.unwrap();
    assert_eq!(got.len(), 1, "{backend}: a full batch at once");
    assert_eq!(got[0].id, id_young);
    assert!(
        q.lease(LeaseRequest::new(c, 10, ttl, u64::MAX))
            .await
            .unwrap()
            .is_empty(),
        "{backend}: both are leased"
    );

    let tx = tower_x402::primitives::B256::repeat_byte(0xab);
    assert!(
        matches!(q.sent(b, &[id_old], tx).await, Err(StoreError::NotHeld)),
        "{backend}: sent needs the lease"
    );
    assert!(
        matches!(
            q.sent(a, &[id_old, id_young], tx).await,
            Err(StoreError::NotHeld)
        ),
        "{backend}: all or nothing"
    );
    q.sent(a, &[id_old], tx).await.unwrap();
    q.sent(a, &[id_old], tx).await.unwrap();
    q.renew(a, &[id_old], ttl).await.unwrap();
    assert!(
        matches!(q.renew(b, &[id_old], ttl).await, Err(StoreError::NotHeld)),
        "{backend}: renew needs the lease"
    );

    // Released after a failure: due again at once, leased before (recovered), one attempt.
    q.release(b, &[id_young], Duration::ZERO, true)
        .await
        .unwrap();
    let got = q.lease(LeaseRequest::new(c, 10, ttl, 0)).await.unwrap();
    assert_eq!(got.len(), 1, "{backend}");
    assert_eq!(got[0].id, id_young);
    assert!(got[0].recovered, "{backend}: leased before");
    assert_eq!(got[0].attempts, 1, "{backend}");

    let settled = Final::Settled {
        tx: Some(tx),
        gas_used: Some(40_000),
    };
    assert_eq!(
        q.finish(&[(id_old, settled.clone())]).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        q.finish(&[(id_old, settled)]).await.unwrap(),
        vec![false],
        "{backend}: final once"
    );
    assert_eq!(q.pending().await.unwrap(), 1, "{backend}");
    let e = q.exposure(&young).await.unwrap();
    assert_eq!(
        e.owed,
        U256::from(2_000),
        "{backend}: the settled one is not owed"
    );

    // An expired lease is taken over, with its `sent` hashes, and its old owner can no
    // longer record a broadcast.
    let third = queued_payment(payer, 3_000);
    let Appended::Accepted(id_third) = q.append(&third, ms(1)).await.unwrap() else {
        panic!("{backend}: accepted")
    };
    let short = Duration::from_millis(200);
    let got = q
        .lease(LeaseRequest::new(a, 10, short, u64::MAX))
        .await
        .unwrap();
    assert_eq!(got.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id_third]);
    let tx3 = tower_x402::primitives::B256::repeat_byte(0xcd);
    q.sent(a, &[id_third], tx3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got = q
        .lease(LeaseRequest::new(b, 10, ttl, u64::MAX))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{backend}: taken over");
    assert_eq!(got[0].id, id_third);
    assert!(got[0].recovered, "{backend}: read the chain first");
    assert_eq!(got[0].sent, vec![tx3], "{backend}: with its sent hash");
    assert!(
        matches!(q.sent(a, &[id_third], tx3).await, Err(StoreError::NotHeld)),
        "{backend}: the old owner cannot broadcast"
    );
    let failed = Final::Failed {
        reason: "invalid_exact_evm_payload_signature".into(),
        tx: None,
    };
    assert_eq!(
        q.finish(&[
            (id_young, failed),
            (
                id_third,
                Final::Settled {
                    tx: Some(tx3),
                    gas_used: None
                }
            )
        ])
        .await
        .unwrap(),
        vec![true, true]
    );
    assert_eq!(q.pending().await.unwrap(), 0, "{backend}: all final");
}

/// A payment id no other test uses (for payer `0x22..22`).
pub fn random_id_key() -> IdempotencyKey {
    IdempotencyKey {
        payer: Address::repeat_byte(0x22),
        id: PaymentId::parse(&format!("pay_{}", random_nonce())[..40]).expect("a valid id"),
    }
}

fn stored(body: &'static str) -> StoredResponse {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-test", http::HeaderValue::from_static("1"));
    StoredResponse {
        status: http::StatusCode::OK,
        headers,
        body: bytes::Bytes::from_static(body.as_bytes()),
        rejection: None,
    }
}

fn fingerprint(b: u8) -> Fingerprint {
    Fingerprint(B256::repeat_byte(b))
}

/// The [`IdempotencyStore`] contract: one starter; the same fingerprint waits (in
/// progress) then gets the stored response; another fingerprint conflicts; only the holder
/// completes or aborts; abort forgets the id; an expired entry is free again. Takes ~2 s.
pub async fn idempotency_store<S: IdempotencyStore>(backend: &str, s: &S) {
    let far = now() + 3600;
    let key = random_id_key();
    let (fp, other) = (fingerprint(1), fingerprint(2));
    let Begin::Started(t) = s.begin(&key, fp, far).await.unwrap() else {
        panic!("{backend}: the first begin starts")
    };
    assert_eq!(
        s.begin(&key, fp, far).await.unwrap(),
        Begin::InProgress,
        "{backend}"
    );
    assert_eq!(
        s.begin(&key, other, far).await.unwrap(),
        Begin::Conflict,
        "{backend}"
    );
    let stranger = ClaimToken(t.0 ^ 1);
    not_held(s.complete(&key, stranger, &stored("x")).await, backend);
    not_held(s.abort(&key, stranger).await, backend);
    assert_eq!(
        s.begin(&key, fp, far).await.unwrap(),
        Begin::InProgress,
        "{backend}"
    );

    // Abort forgets it: anyone (any fingerprint) starts afresh; the old token is dead.
    s.abort(&key, t).await.unwrap();
    let Begin::Started(t2) = s.begin(&key, other, far).await.unwrap() else {
        panic!("{backend}: an aborted id starts afresh")
    };
    not_held(s.abort(&key, t).await, backend);
    not_held(s.complete(&key, t, &stored("x")).await, backend);

    // Complete: the same fingerprint gets the response, another conflicts; completing again
    // with the same response is a no-op; the holder can no longer abort.
    let reply = stored("paid content");
    s.complete(&key, t2, &reply).await.unwrap();
    s.complete(&key, t2, &reply).await.unwrap();
    assert_eq!(
        s.begin(&key, other, far).await.unwrap(),
        Begin::Done(Box::new(reply.clone())),
        "{backend}"
    );
    assert_eq!(
        s.begin(&key, fp, far).await.unwrap(),
        Begin::Conflict,
        "{backend}"
    );
    not_held(s.abort(&key, t2).await, backend);
    assert!(
        matches!(s.begin(&key, other, far).await.unwrap(), Begin::Done(_)),
        "{backend}: a failed abort changed nothing"
    );
    not_held(s.abort(&random_id_key(), t2).await, backend);

    // Expiry: an entry until `now + 1` is free once that second has passed.
    let (open, done) = (random_id_key(), random_id_key());
    let soon = now() + 1;
    let Begin::Started(a) = s.begin(&open, fp, soon).await.unwrap() else {
        panic!("{backend}: begin")
    };
    let Begin::Started(b) = s.begin(&done, fp, soon).await.unwrap() else {
        panic!("{backend}: begin")
    };
    s.complete(&done, b, &reply).await.unwrap();
    while now() <= soon {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for k in [open, done] {
        let Begin::Started(fresh) = s.begin(&k, other, far).await.unwrap() else {
            panic!("{backend}: an expired id starts afresh")
        };
        not_held(s.abort(&k, a).await, backend);
        not_held(s.complete(&k, b, &reply).await, backend);
        s.complete(&k, fresh, &reply).await.unwrap();
    }
}

/// A payer no other test uses.
pub fn random_payer() -> Address {
    Address::from_slice(&random_nonce()[..20])
}

fn grant(calls: Option<u64>, expires_at: Option<u64>) -> Grant {
    Grant { calls, expires_at }
}

fn debited(remaining: Option<u64>) -> Debit {
    Debit::Debited { remaining }
}

/// The [`CreditLedger`] contract, at times from `t0` on (Redis needs real times: its keys
/// expire by its own clock; `backend` names the ledger in failures). Each case uses its own
/// payer. Ends with 32 concurrent debits of 10 calls: exactly 10 taken, each count once.
pub async fn credit_ledger(backend: &str, l: Arc<dyn CreditLedger>, t0: u64) {
    let payer = |n: u8| Address::repeat_byte(n);

    // Counted calls: down to zero, then exhausted; a refund gives one back.
    let a = payer(0xa1);
    assert_eq!(
        l.debit(a, t0).await.unwrap(),
        Debit::Exhausted,
        "never bought"
    );
    l.refund(a).await.unwrap();
    assert_eq!(
        l.debit(a, t0).await.unwrap(),
        Debit::Exhausted,
        "a refund creates nothing"
    );
    l.grant(a, grant(Some(2), None), t0).await.unwrap();
    assert_eq!(l.debit(a, t0).await.unwrap(), debited(Some(1)));
    l.refund(a).await.unwrap();
    assert_eq!(l.debit(a, t0).await.unwrap(), debited(Some(1)));
    assert_eq!(l.debit(a, t0).await.unwrap(), debited(Some(0)));
    assert_eq!(l.debit(a, t0).await.unwrap(), Debit::Exhausted);
    // The last call refunded (its handler failed): served again.
    l.refund(a).await.unwrap();
    assert_eq!(l.debit(a, t0).await.unwrap(), debited(Some(0)));
    // A top-up of spent credit adds to zero.
    l.grant(a, grant(Some(3), None), t0).await.unwrap();
    assert_eq!(l.debit(a, t0 + 10_000).await.unwrap(), debited(Some(2)));
    assert_eq!(
        l.debit(payer(0xa2), t0).await.unwrap(),
        Debit::Exhausted,
        "credit is per payer"
    );

    // A window: unlimited until it closes; a refund changes nothing.
    let w = payer(0xb1);
    l.grant(w, grant(None, Some(t0 + 100)), t0).await.unwrap();
    for _ in 0..3 {
        assert_eq!(l.debit(w, t0 + 99).await.unwrap(), debited(None));
    }
    l.refund(w).await.unwrap();
    assert_eq!(l.debit(w, t0 + 99).await.unwrap(), debited(None));
    assert_eq!(l.debit(w, t0 + 100).await.unwrap(), Debit::Expired);
    assert_eq!(l.debit(w, t0 + 150).await.unwrap(), Debit::Expired);
    // Expired credit is replaced (calls, not the old window); live credit adds up and keeps
    // the later expiry.
    l.grant(w, grant(Some(1), Some(t0 + 300)), t0 + 200)
        .await
        .unwrap();
    l.grant(w, grant(Some(2), Some(t0 + 250)), t0 + 200)
        .await
        .unwrap();
    assert_eq!(l.debit(w, t0 + 260).await.unwrap(), debited(Some(2)));
    assert_eq!(l.debit(w, t0 + 299).await.unwrap(), debited(Some(1)));
    assert_eq!(l.debit(w, t0 + 300).await.unwrap(), Debit::Expired);

    // Counted calls with a deadline: expiry wins over calls left; expired credit is not
    // topped up by a new grant.
    let c = payer(0xc1);
    l.grant(c, grant(Some(5), Some(t0 + 10)), t0).await.unwrap();
    assert_eq!(l.debit(c, t0 + 9).await.unwrap(), debited(Some(4)));
    assert_eq!(l.debit(c, t0 + 10).await.unwrap(), Debit::Expired);
    l.grant(c, grant(Some(2), None), t0 + 10).await.unwrap();
    assert_eq!(l.debit(c, t0 + 1_000).await.unwrap(), debited(Some(1)));
    assert_eq!(l.debit(c, t0 + 1_000).await.unwrap(), debited(Some(0)));
    assert_eq!(l.debit(c, t0 + 1_000).await.unwrap(), Debit::Exhausted);

    // A window absorbs counted calls and "no time limit" absorbs a deadline: live credit
    // never shrinks by a top-up.
    let d = payer(0xd1);
    l.grant(d, grant(Some(5), None), t0).await.unwrap();
    l.grant(d, grant(None, Some(t0 + 100)), t0).await.unwrap();
    assert_eq!(l.debit(d, t0 + 5_000).await.unwrap(), debited(None));
    let e = payer(0xe1);
    l.grant(e, grant(Some(1), Some(t0 + 50)), t0).await.unwrap();
    l.grant(e, grant(Some(1), Some(t0 + 40)), t0).await.unwrap();
    assert_eq!(
        l.debit(e, t0 + 45).await.unwrap(),
        debited(Some(1)),
        "the later expiry"
    );
    assert_eq!(l.debit(e, t0 + 50).await.unwrap(), Debit::Expired);

    // Concurrent debits never take more than was granted.
    let r = payer(0xf1);
    l.grant(r, grant(Some(10), None), t0).await.unwrap();
    let debits: Vec<_> = (0..32)
        .map(|_| {
            let l = l.clone();
            tokio::spawn(async move { l.debit(r, t0).await.unwrap() })
        })
        .collect();
    let mut remaining = Vec::new();
    for d in debits {
        match d.await.unwrap() {
            Debit::Debited { remaining: Some(n) } => remaining.push(n),
            Debit::Exhausted => {}
            other => panic!("{backend}: {other:?}"),
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..10).collect::<Vec<u64>>(),
        "{backend}: each call once"
    );
}
