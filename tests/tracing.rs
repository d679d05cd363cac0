//! The `tracing` span of a paid request. In a test binary of its own: tracing caches
//! whether a callsite is enabled, and a thread-local subscriber set while other tests' threads
//! hit the same callsites can race with that cache.
#![cfg(all(feature = "test-util", feature = "tracing"))]

mod common;

use common::*;
use http::StatusCode;
use tower::Layer;

// ------------------------------------------------------------------------------------------------
// tracing

mod capture {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer};

    /// Fields recorded on `x402.payment` spans, as `name=value` strings.
    #[derive(Clone, Default)]
    pub struct Fields(pub Arc<Mutex<Vec<String>>>);

    struct Visitor<'a>(&'a Mutex<Vec<String>>);

    impl Visit for Visitor<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}={value:?}", field.name()));
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}={value}", field.name()));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}={value}", field.name()));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Fields {
        fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            if attrs.metadata().name() == "x402.payment" {
                self.0.lock().unwrap().push("span".into());
            }
        }
        fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
            values.record(&mut Visitor(&self.0));
        }
    }
}

#[tokio::test]
async fn a_paid_request_gets_a_span_with_payer_amount_network_outcome_and_timings() {
    use tracing_subscriber::layer::SubscriberExt;
    let fields = capture::Fields::default();
    let subscriber = tracing_subscriber::registry().with(fields.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let proof = proof_v2();
    assert_eq!(
        get_with(&svc, "/paid", [proof.clone()]).await.status,
        StatusCode::OK
    );
    let recorded = fields.0.lock().unwrap().clone();
    let has = |prefix: &str| recorded.iter().any(|f| f.starts_with(prefix));
    assert_eq!(recorded.first().map(String::as_str), Some("span"));
    assert!(has(&format!("payer={}", payer().address())), "{recorded:?}");
    assert!(
        has("amount=1000") && has("network=eip155:84532"),
        "{recorded:?}"
    );
    assert!(has("verify_us=") && has("settle_us="), "{recorded:?}");
    assert!(has("status=200") && has("outcome=paid"), "{recorded:?}");

    fields.0.lock().unwrap().clear();
    get_with(&svc, "/paid", [proof]).await;
    let recorded = fields.0.lock().unwrap().clone();
    assert!(
        recorded.contains(&"status=402".to_owned())
            && recorded.contains(&format!("outcome={NONCE_USED}")),
        "{recorded:?}"
    );
}
