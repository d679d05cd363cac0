//! A custom verifier, as a new user writes it from the `Verifier` docs: the built-in checks
//! plus a deny-list, refusing with 403 and its own code; the handler never runs for it.
#![cfg(all(feature = "test-util", feature = "axum"))]

mod common;

use std::collections::HashSet;

use common::*;
use http::StatusCode;
use tower::Layer;
use tower_x402::primitives::Address;
use tower_x402::proto::{PaymentPayload, v2::PaymentRequirements};
use tower_x402::rejection::Reason;
use tower_x402::verify::{EvmVerifier, VerifiedPayment, Verifier, VerifyError};

struct DenyList {
    inner: EvmVerifier,
    denied: HashSet<Address>,
}

#[tower_x402::async_trait]
impl Verifier for DenyList {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        let payment = self.inner.verify(payload, requirements).await?;
        if self.denied.contains(&payment.payer) {
            return Err(VerifyError::Policy {
                status: StatusCode::FORBIDDEN,
                reason: Reason::custom(format!("payer_denied_{}", self.denied.len())),
                message: "this payer may not buy this resource".into(),
            });
        }
        Ok(payment)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_payer_gets_403_with_the_verifiers_code_and_the_handler_never_runs() {
    let clock = clock();
    let hits = Hits::new();
    // One store for both layers below: the refusal must leave the proof unspent in it.
    let store = std::sync::Arc::new(tower_x402::MemoryNonceStore::with_capacity_and_clock(
        100,
        clock.clone(),
    ));
    let layer = builder(&clock)
        .nonce_store(store.clone())
        .verifier(DenyList {
            inner: EvmVerifier::new().with_clock(clock.clone()),
            denied: HashSet::from([payer().address()]),
        })
        .build()
        .unwrap();
    let svc = layer.layer(app(&hits));
    let proof = proof_v2();
    let r = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "payer_denied_1");
    assert_eq!(r.json()["message"], "this payer may not buy this resource");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let info = r.rejection.as_ref().expect("a PaymentRejection");
    assert_eq!(info.reason, Some(Reason::custom("payer_denied_1")));
    assert_eq!(hits.get(), 0);
    // Refused before the claim: the same proof still buys the call where it is allowed.
    let open = builder(&clock).nonce_store(store).build().unwrap();
    let r = get_with(&open.layer(app(&hits)), "/paid", [proof]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn a_policy_status_outside_4xx_is_sent_as_403() {
    struct Odd;
    #[tower_x402::async_trait]
    impl Verifier for Odd {
        async fn verify(
            &self,
            _: &PaymentPayload,
            _: &PaymentRequirements,
        ) -> Result<VerifiedPayment, VerifyError> {
            Err(VerifyError::Policy {
                status: StatusCode::OK,
                reason: Reason::custom("nope"),
                message: "no".into(),
            })
        }
    }
    let clock = clock();
    let hits = Hits::new();
    let svc = builder(&clock)
        .verifier(Odd)
        .build()
        .unwrap()
        .layer(app(&hits));
    let r = get_with(&svc, "/paid", [proof_v2()]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(hits.get(), 0);
}
