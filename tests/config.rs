//! Builder calls that would silently undo each other are refused at build time.

use std::sync::Arc;

use tower_x402::error::ConfigError;
use tower_x402::idempotency::{Idempotency, MemoryIdempotencyStore};
use tower_x402::primitives::{Address, address};
use tower_x402::{Asset, Network, PaymentLayer, PaymentOption};

const PAY_TO: Address = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");

fn contradiction(r: Result<PaymentLayer, ConfigError>) -> String {
    match r {
        Err(e @ ConfigError::Contradictory(_)) => e.to_string(),
        other => panic!("expected a contradiction, got {other:?}"),
    }
}

#[test]
fn pricing_with_a_price_or_options_is_refused() {
    let usdc = Asset::usdc_base_sepolia();
    let opts: Arc<[PaymentOption]> =
        Arc::new([PaymentOption::exact(&usdc, "$0.01", PAY_TO).unwrap()]);
    let priced = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .network(Network::BASE_SEPOLIA)
        .price("$0.001")
        .pricing({
            let o = opts.clone();
            move |_| Some(o.clone())
        })
        .build();
    assert!(contradiction(priced).contains(".pricing"));
    let accepted = PaymentLayer::builder()
        .accept(opts[0].clone())
        .pricing(move |_| Some(opts.clone()))
        .build();
    assert!(contradiction(accepted).contains(".pricing"));
}

#[test]
fn idempotency_settings_without_idempotency_are_refused() {
    let base = || {
        PaymentLayer::builder()
            .pay_to(PAY_TO)
            .network(Network::BASE_SEPOLIA)
            .price("$0.001")
    };
    let msg = contradiction(base().idempotency_required(true).build());
    assert!(msg.contains(".idempotency(store)"), "{msg}");
    contradiction(base().idempotency_max_body(1024).build());
    // With a store, both spellings build.
    let builds = [
        base()
            .idempotency(MemoryIdempotencyStore::new())
            .idempotency_required(true)
            .build(),
        base()
            .idempotency(Idempotency::new(MemoryIdempotencyStore::new()).required(true))
            .build(),
    ];
    for b in builds {
        assert!(b.is_ok(), "{b:?}");
    }
}
