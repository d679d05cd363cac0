//! Cost of each step of the paid path, and the whole in-process verification.
//!
//! `cargo bench --bench verify --features test-util,dev-heavy`. Targets (issue 3): full verification
//! ≤ 1.15 × one signature recovery (the physical floor), nonce claim ≤ 1 µs. `upto_*`: the
//! same for a Permit2 `upto` proof (its digest takes six keccaks to `exact`'s two).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use tower_x402::clock::FixedClock;
use tower_x402::nonce::{MemoryNonceStore, NonceKey, NonceStore};
use tower_x402::primitives::{Address, B256, U256, address};
use tower_x402::proto::header::decode_bytes;
use tower_x402::proto::{PaymentPayload, v2};
use tower_x402::test_util::{demo_payer, encode, exact_payload, pay_upto, upto_payload, v2_json};
use tower_x402::verify::exact::{domain_separator, recover_signer, signing_hash};
use tower_x402::verify::upto::signing_hash as upto_signing_hash;
use tower_x402::{Asset, EvmVerifier, PaymentOption};

const NOW: u64 = 1_760_000_000;

/// Polls a future that completes without waiting (the memory store never waits).
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("future did not complete immediately"),
    }
}

fn bench(c: &mut Criterion) {
    let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    let option =
        PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", pay_to).expect("valid option");
    let req = option.requirements().clone();
    let signer = demo_payer();
    let payload = exact_payload(&signer, &req, NOW);
    let header = encode(&v2_json(&req, &payload, None));
    let decoded = PaymentPayload::V2(
        serde_json::from_slice::<v2::PaymentPayload>(&decode_bytes(&header, 8192).expect("b64"))
            .expect("json"),
    );
    // The layer's default verifier: exact and upto, each by its own.
    let verifier = EvmVerifier::new().with_clock(FixedClock::new(NOW));
    let sep = domain_separator("USDC", "2", 84532, req.asset.evm().unwrap());
    let digest = signing_hash(sep, &payload.authorization);

    let mut g = c.benchmark_group("paid_path");
    g.bench_function("header_decode", |b| {
        b.iter(|| {
            let json = decode_bytes(black_box(&header), 8192).expect("b64");
            serde_json::from_slice::<v2::PaymentPayload>(&json).expect("json")
        })
    });
    // The verifier caches the separator per token, so the paid path pays only the digest.
    g.bench_function("eip712_digest", |b| {
        b.iter(|| signing_hash(black_box(sep), black_box(&payload.authorization)))
    });
    g.bench_function("domain_separator_uncached", |b| {
        b.iter(|| domain_separator("USDC", "2", 84532, black_box(req.asset.evm().unwrap())))
    });
    g.bench_function("recover", |b| {
        b.iter(|| recover_signer(black_box(digest), black_box(&payload.signature)).expect("valid"))
    });
    g.bench_function("full_verify", |b| {
        b.iter(|| {
            verifier
                .verify_sync(black_box(&decoded), black_box(&req))
                .expect("valid")
        })
    });
    // upto: the Permit2 witness digest (alloy's `sol!` EIP-712, with its nested struct
    // hashes) and the same one recovery.
    let upto_option = PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.05", pay_to, pay_to)
        .expect("valid upto option");
    let upto_req = upto_option.requirements().clone();
    let upto = upto_payload(&signer, &upto_req, NOW);
    let (_, upto_header) = pay_upto(&upto_req, &upto);
    let upto_decoded = PaymentPayload::V2(
        serde_json::from_slice::<v2::PaymentPayload>(
            &decode_bytes(&upto_header, 8192).expect("b64"),
        )
        .expect("json"),
    );
    g.bench_function("upto_digest", |b| {
        b.iter(|| upto_signing_hash(84532, black_box(&upto.permit2_authorization)))
    });
    g.bench_function("upto_full_verify", |b| {
        b.iter(|| {
            verifier
                .verify_sync(black_box(&upto_decoded), black_box(&upto_req))
                .expect("valid")
        })
    });
    // Time moves on every million claims so old entries expire and are swept, as in a
    // long-running server: the amortized sweep is part of the measured cost.
    let clock = FixedClock::new(NOW);
    let store = MemoryNonceStore::with_capacity_and_clock(4_000_000, clock.clone());
    let mut i = 0u64;
    g.bench_function("nonce_claim", |b| {
        b.iter(|| {
            i += 1;
            if i.is_multiple_of(1_000_000) {
                clock.advance(600);
            }
            let key = NonceKey {
                chain_id: 84532,
                asset: req.asset.evm().unwrap(),
                from: Address::repeat_byte(7),
                nonce: B256::from(U256::from(i)),
            };
            let expires = NOW + (i / 1_000_000) * 600 + 300;
            now_or_never(store.reserve(black_box(&key), expires)).expect("reserved")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
