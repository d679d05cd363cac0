//! `PaymentMetrics` through a real Prometheus recorder: exact counter values and histogram
//! sample counts after known traffic, read from a `/metrics` scrape over HTTP (first test) or
//! from the rendered exposition (the others).
//!
//! The recorder is global to this test binary and tests run in parallel, so every test tags
//! its layer with its own `test` label and reads only its own series.
#![cfg(all(feature = "metrics", feature = "axum", feature = "test-util"))]

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use axum::Router;
use axum::routing::get;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_x402::metrics::{PaymentMetrics, name};
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::{Network, VerifiedPayment};

use common::*;

/// The one recorder of this binary.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this binary");
        handle
    })
}

/// One sample of the text exposition: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (the subset the exporter writes: no escapes in values).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let labels = body
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("label k=v");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().expect("numeric value"),
            }
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`, if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<_> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert!(found.len() <= 1, "duplicate series {name} {want:?}");
    found.first().map(|s| s.value)
}

/// Every series of `name` carrying `test="{test}"`.
fn series<'a>(samples: &'a [Sample], name: &str, test: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels.get("test").map(String::as_str) == Some(test))
        .collect()
}

const NETWORK: &str = "eip155:84532";

fn usdc() -> String {
    USDC.to_checksum(None)
}

/// A malformed payment header: not base64.
fn garbage() -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static("payment-signature"),
        HeaderValue::from_static("%%% not base64 %%%"),
    )
}

#[tokio::test]
async fn scrape_counts_a_paid_an_unpaid_and_a_malformed_request() {
    let handle = recorder().clone();
    let clock = clock();
    let hits = Hits::new();
    let paywall = builder(&clock)
        .hook(PaymentMetrics::new().with_label("test", "wire"))
        .build()
        .expect("valid layer");
    let app = app(&hits)
        .route_layer(paywall)
        .merge(Router::new().route("/metrics", get(move || async move { handle.render() })));
    let (addr, server) = serve(app).await;
    let client = client();

    let unpaid = wire(&client, addr, "/paid", []).await;
    assert_eq!(unpaid.status, StatusCode::PAYMENT_REQUIRED);
    let paid = wire(&client, addr, "/paid", [proof_v2()]).await;
    assert_eq!(paid.status, StatusCode::OK);
    let bad = wire(&client, addr, "/paid", [garbage()]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(hits.get(), 1, "only the paid request ran the handler");

    let scrape = wire(&client, addr, "/metrics", []).await;
    assert_eq!(scrape.status, StatusCode::OK);
    let text = String::from_utf8(scrape.body.to_vec()).expect("UTF-8 exposition");
    let samples = parse(&text);
    let usdc = usdc();
    let paid_labels = [("test", "wire"), ("network", NETWORK), ("asset", &usdc)];

    assert_eq!(
        value(&samples, name::CHALLENGES, &[("test", "wire")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &samples,
            name::VERIFIED,
            &[paid_labels.as_slice(), &[("version", "2")]].concat()
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, name::SETTLED, &paid_labels),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, name::AMOUNT_RECEIVED, &paid_labels),
        Some(1000.0),
        "{text}"
    );
    assert_eq!(
        value(
            &samples,
            name::REJECTED,
            &[
                ("test", "wire"),
                ("status", "400"),
                ("reason", "invalid_payload"),
                ("stage", "decode"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
    // The challenge is not a rejection, and nothing else was refused.
    assert_eq!(series(&samples, name::REJECTED, "wire").len(), 1, "{text}");
    assert!(series(&samples, name::SETTLEMENT_FAILURES, "wire").is_empty());

    // One sample per histogram: the exporter renders summaries (`_count`, `_sum`).
    let network = [("test", "wire"), ("network", NETWORK)];
    for histogram in [name::VERIFY_DURATION, name::SETTLE_DURATION] {
        let count = value(&samples, &format!("{histogram}_count"), &network);
        assert_eq!(count, Some(1.0), "{histogram}: {text}");
        let sum = value(&samples, &format!("{histogram}_sum"), &network).expect("a _sum");
        assert!((0.0..5.0).contains(&sum), "{histogram} took {sum} s");
    }
    // The verification did real signature work: its sample is not zero.
    let verify = value(
        &samples,
        &format!("{}_sum", name::VERIFY_DURATION),
        &network,
    );
    assert!(verify.is_some_and(|s| s > 0.0), "{text}");
    server.abort();
}

/// Refuses every settlement with a fixed reason, or says the backend is down.
struct FailingSettler {
    down: bool,
}

#[async_trait]
impl Settler for FailingSettler {
    async fn settle(&self, _payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        if self.down {
            Err(SettleError::Unavailable {
                retry_after: None,
                source: "rpc down".into(),
            })
        } else {
            Err(SettleError::Refused {
                reason: tower_x402::rejection::Reason::from_wire(
                    "invalid_exact_evm_insufficient_balance",
                )
                .expect("a catalogued reason"),
                transaction: None,
            })
        }
    }
}

#[tokio::test]
async fn settlement_failures_and_replays_are_counted_by_reason() {
    // Installed before the first request: counted into the no-op recorder, it would be lost.
    let recorder = recorder();
    let clock = clock();
    let hits = Hits::new();
    let refusing = app(&hits).route_layer(
        builder(&clock)
            .settler(FailingSettler { down: false })
            .hook(PaymentMetrics::new().with_label("test", "settle"))
            .build()
            .expect("valid layer"),
    );
    let down = app(&hits).route_layer(
        builder(&clock)
            .settler(FailingSettler { down: true })
            .hook(PaymentMetrics::new().with_label("test", "settle"))
            .build()
            .expect("valid layer"),
    );

    let refused_proof = proof_v2();
    let refused = get_with(&refusing, "/paid", [refused_proof.clone()]).await;
    assert_eq!(
        refused.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_insufficient_balance".into())
        )
    );
    // Refused after the handler ran: the proof is spent, a replay is refused at the claim.
    let replay = get_with(&refusing, "/paid", [refused_proof]).await;
    assert_eq!(
        replay.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    let unavailable = get_with(&down, "/paid", [proof_v2()]).await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);

    let text = recorder.render();
    let samples = parse(&text);
    let rejected = |status, reason, stage| {
        value(
            &samples,
            name::REJECTED,
            &[
                ("test", "settle"),
                ("status", status),
                ("reason", reason),
                ("stage", stage),
            ],
        )
    };
    assert_eq!(
        rejected("402", "invalid_exact_evm_insufficient_balance", "settle"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(rejected("402", NONCE_USED, "reserve"), Some(1.0), "{text}");
    assert_eq!(
        rejected("503", "service_unavailable", "settle"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(&samples, name::REJECTED, "settle").len(),
        3,
        "{text}"
    );

    let failures = |reason| {
        value(
            &samples,
            name::SETTLEMENT_FAILURES,
            &[("test", "settle"), ("reason", reason)],
        )
    };
    assert_eq!(
        failures("invalid_exact_evm_insufficient_balance"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(failures("service_unavailable"), Some(1.0), "{text}");
    assert_eq!(
        series(&samples, name::SETTLEMENT_FAILURES, "settle").len(),
        2,
        "the replay is not a settlement failure: {text}"
    );
    // Three proofs verified (the replay too: the claim comes after verification), none settled.
    let usdc = usdc();
    let verified = [
        ("test", "settle"),
        ("network", NETWORK),
        ("asset", usdc.as_str()),
        ("version", "2"),
    ];
    assert_eq!(
        value(&samples, name::VERIFIED, &verified),
        Some(3.0),
        "{text}"
    );
    assert!(
        series(&samples, name::SETTLED, "settle").is_empty(),
        "{text}"
    );
    assert!(series(&samples, name::AMOUNT_RECEIVED, "settle").is_empty());
    assert_eq!(hits.get(), 2, "the replay did not run the handler");
}

#[tokio::test]
async fn v1_payments_and_networks_get_their_labels() {
    // Installed before the first request: counted into the no-op recorder, it would be lost.
    let recorder = recorder();
    let clock = clock();
    let hits = Hits::new();
    let svc = app(&hits).route_layer(
        builder(&clock)
            .hook(
                PaymentMetrics::new()
                    .with_label("test", "v1")
                    .with_label("api", "weather"),
            )
            .build()
            .expect("valid layer"),
    );
    for _ in 0..2 {
        let res = get_with(&svc, "/paid", [proof_v1()]).await;
        assert_eq!(res.status, StatusCode::OK);
    }
    let text = recorder.render();
    let samples = parse(&text);
    let usdc = usdc();
    let network = Network::BASE_SEPOLIA.to_string();
    let labels = [
        ("test", "v1"),
        ("api", "weather"),
        ("network", network.as_str()),
        ("asset", usdc.as_str()),
    ];
    assert_eq!(
        value(
            &samples,
            name::VERIFIED,
            &[labels.as_slice(), &[("version", "1")]].concat()
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(value(&samples, name::SETTLED, &labels), Some(2.0), "{text}");
    assert_eq!(
        value(&samples, name::AMOUNT_RECEIVED, &labels),
        Some(2000.0),
        "{text}"
    );
}
