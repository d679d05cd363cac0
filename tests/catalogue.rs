//! The failure catalogue (the tables in the `rejection` module docs, src/rejection.rs) against
//! the code, so the docs cannot drift:
//!
//! * every reason code in the source (`rejection::reason`, `onchain::reason`,
//!   `VerifyError::reason`, `SettleError::reason`, `HeaderError::reason`) is in the catalogue;
//! * the layer is driven into every situation it can refuse in (hostile headers, each
//!   `VerifyError` variant, each settler and nonce-store failure, overload, hooks), and each
//!   answer's status, reason and `Retry-After` must match a row of the table;
//! * every (status, reason) the table lists is produced by one of those requests: a stale or
//!   mistyped row fails;
//! * failed receipts match the receipt table.
#![cfg(all(
    feature = "axum",
    feature = "test-util",
    feature = "facilitator",
    feature = "onchain"
))]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_x402::hooks::{HookResponse, PaymentHooks};
use tower_x402::nonce::{ClaimToken, NonceKey, Reservation, StoreError};
use tower_x402::primitives::{Address, U256};
use tower_x402::proto::PaymentPayload;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::rejection::Reason;
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::test_util::{encode, exact_payload, v2_json};
use tower_x402::verify::{SignatureError, VerifyError};
use tower_x402::{
    ExactEvmVerifier, Network, NonceStore, PaymentLayerBuilder, PaymentRejection, VerifiedPayment,
    Verifier,
};

use common::*;

// ------------------------------------------------------------------------------------------------
// The catalogue, parsed from the docs

fn source(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// The module docs of src/rejection/mod.rs.
fn docs() -> String {
    source("src/rejection/mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code spans of `text` that look like reason codes (`lower_snake_case`).
fn codes(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_owned)
        .collect()
}

/// The rows of the markdown table whose header starts with `header`.
fn table(docs: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = docs.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no table headed {header:?}");
    lines
        .skip(1) // |---|
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Code(u16),
    /// "the hook's": whatever the hook answered.
    Hook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryAfter {
    Yes,
    No,
    Hook,
}

/// A row of the main table.
#[derive(Debug)]
struct Row {
    situation: String,
    status: Status,
    /// The reason codes listed; empty for "—".
    reasons: BTreeSet<String>,
    /// The row also allows any facilitator code of `KNOWN`.
    known: bool,
    retry_after: RetryAfter,
}

fn rows() -> Vec<Row> {
    let rows: Vec<Row> = table(&docs(), "| Situation | Status | Reason | Retry-After |")
        .into_iter()
        .map(|cells| {
            assert_eq!(cells.len(), 5, "row {cells:?}");
            let status = match cells[1].as_str() {
                "the hook's" => Status::Hook,
                s => Status::Code(s.parse().unwrap_or_else(|_| panic!("status {s:?}"))),
            };
            let retry_after = match cells[3].as_str() {
                "yes" => RetryAfter::Yes,
                "no" => RetryAfter::No,
                "the hook's" => RetryAfter::Hook,
                r => panic!("Retry-After cell {r:?}"),
            };
            let reasons = if cells[2] == "—" {
                BTreeSet::new()
            } else {
                codes(&cells[2])
            };
            assert!(
                cells[2] == "—" || !reasons.is_empty(),
                "row without a reason: {cells:?}"
            );
            Row {
                situation: cells[0].clone(),
                status,
                reasons,
                known: cells[2].contains("[`KNOWN`]"),
                retry_after,
            }
        })
        .collect();
    assert!(rows.len() >= 15, "the table parsed to {} rows", rows.len());
    rows
}

// ------------------------------------------------------------------------------------------------
// Reason codes, parsed from the source

/// The wire string of each `Reason` variant, by its Rust name (the typed catalogue).
fn variants() -> std::collections::BTreeMap<String, String> {
    tower_x402::rejection::Reason::ALL
        .iter()
        .map(|r| (format!("{r:?}"), r.as_str().to_owned()))
        .collect()
}

/// The wire strings named by `text`: every `Reason::Variant`, and every
/// `rejection::reason::CONST` alias followed to its variant.
fn named_reasons(text: &str) -> BTreeSet<String> {
    let variants = variants();
    let aliases = reason_consts("src/reason.rs", "");
    let mut out = BTreeSet::new();
    for part in text.split("Reason::").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
        if let Some(wire) = variants.get(&name) {
            out.insert(wire.clone());
        }
    }
    let after = |sep| text.split(sep).skip(1);
    for part in after("rejection::reason::").chain(after("crate::reason::")) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if let Some(wire) = aliases.get(&name) {
            out.insert(wire.clone());
        }
    }
    out
}

/// `NAME → wire` of the `pub const NAME: Reason = Reason::Variant;` items of `path`, inside
/// its `pub mod reason {` (or the whole file when `module` is empty).
fn reason_consts(path: &str, module: &str) -> std::collections::BTreeMap<String, String> {
    let src = source(path);
    let body = if module.is_empty() {
        src.as_str()
    } else {
        let body = src
            .split(module)
            .nth(1)
            .unwrap_or_else(|| panic!("{path} has no `{module}`"));
        &body[..body.find("\n}").expect("end of mod reason")]
    };
    let variants = variants();
    let mut out = std::collections::BTreeMap::new();
    // A const may wrap over two lines: join each item up to its `;`.
    for item in body.split(';') {
        let Some(at) = item.find("pub const ") else {
            continue;
        };
        let item = &item[at + "pub const ".len()..];
        let name: String = item
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let Some(rhs) = item.split('=').nth(1) else {
            continue;
        };
        let rhs = rhs.trim();
        if let Some(v) = rhs
            .rsplit("Reason::")
            .next()
            .filter(|_| rhs.contains("Reason::"))
            && let Some(wire) = variants.get(v.trim())
        {
            out.insert(name, wire.clone());
        } else if let Some(alias) = rhs
            .rsplit("reason::")
            .next()
            .filter(|_| rhs.contains("reason::"))
        {
            // An alias of a layer code: resolved against the layer's own constants.
            let layer = reason_consts("src/reason.rs", "");
            if let Some(wire) = layer.get(alias.trim()) {
                out.insert(name, wire.clone());
            }
        }
    }
    out
}

/// The codes returned by the `pub fn reason(&self)` of `path` (the first one after `after`).
fn reason_fn_literals(path: &str, after: &str) -> BTreeSet<String> {
    let src = source(path);
    let from = src
        .find(after)
        .unwrap_or_else(|| panic!("{after} in {path}"));
    let body = &src[from..];
    let start = body
        .find("pub fn reason(&self) -> ")
        .unwrap_or_else(|| panic!("no reason() in {path}"));
    let body = &body[start..];
    let body = &body[..body.find("\n    }\n").expect("end of fn reason")];
    named_reasons(body)
}

#[test]
fn every_reason_code_in_the_source_is_in_the_catalogue() {
    let docs = docs();
    let documented = codes(&docs);
    let in_table: BTreeSet<String> = rows().iter().flat_map(|r| r.reasons.clone()).collect();
    // Opt-in features (bound challenges, idempotency, prepaid) have a table of their own,
    // driven by their own tests; their codes must be in it.
    let opt_in: BTreeSet<String> = table(
        &docs,
        "| Opt-in situation | Status | Reason | Retry-After |",
    )
    .iter()
    .flat_map(|cells| codes(&cells[2]))
    .collect();
    assert!(opt_in.contains("payment_identifier_conflict"), "{opt_in:?}");

    let layer: BTreeSet<String> = reason_consts("src/reason.rs", "").into_values().collect();
    let onchain: BTreeSet<String> = reason_consts("src/settle/onchain/mod.rs", "pub mod reason {")
        .into_values()
        .collect();
    let verify = reason_fn_literals("src/verify/mod.rs", "impl VerifyError");
    let settle = reason_fn_literals("src/settle/mod.rs", "impl SettleError");
    let header = reason_fn_literals("src/proto/header.rs", "impl HeaderError");
    // The parser sees what it should (a parser finding nothing would pass vacuously).
    assert!(
        layer.contains(tower_x402::rejection::reason::OVERLOADED.as_str()),
        "{layer:?}"
    );
    assert!(layer.len() >= 11, "{layer:?}");
    assert!(onchain.contains(tower_x402::settle::onchain::reason::INSUFFICIENT_FUNDS.as_str()));
    assert!(verify.contains("invalid_exact_evm_signature") && verify.len() >= 9);
    assert!(settle.contains("unexpected_settle_error"), "{settle:?}");
    assert!(header.contains("invalid_x402_version"), "{header:?}");

    // What the layer sends is in the main table; the codes that only travel in receipts or
    // errors are at least in the catalogue.
    for code in layer.iter().chain(&onchain).chain(&header) {
        assert!(
            in_table.contains(code) || opt_in.contains(code),
            "{code} is not in the failure tables"
        );
    }
    for code in verify.iter().chain(&settle) {
        assert!(documented.contains(code), "{code} is not in the catalogue");
    }
    for code in &verify {
        assert!(
            in_table.contains(code) || code == "unexpected_verify_error",
            "{code} (a VerifyError reason) is not in the failure table"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Test doubles

type MakeVerifyError = Arc<dyn Fn() -> VerifyError + Send + Sync>;
type MakeSettleError = Arc<dyn Fn() -> SettleError + Send + Sync>;

/// A verifier that refuses with a fixed error.
struct Refusing(MakeVerifyError);

#[async_trait]
impl Verifier for Refusing {
    async fn verify(
        &self,
        _payload: &PaymentPayload,
        _requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        Err((self.0)())
    }
}

/// A settler failing in `check` or in `settle`.
struct Failing {
    check: Option<MakeSettleError>,
    settle: Option<MakeSettleError>,
}

#[async_trait]
impl Settler for Failing {
    async fn check(&self, _payment: &VerifiedPayment) -> Result<(), SettleError> {
        self.check.as_ref().map_or(Ok(()), |f| Err(f()))
    }
    async fn settle(&self, _payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        self.settle
            .as_ref()
            .map_or(Ok(Settlement::default()), |f| Err(f()))
    }
}

/// A nonce store that is down (or full).
struct Down {
    full: bool,
}

#[async_trait]
impl NonceStore for Down {
    async fn reserve(&self, _key: &NonceKey, _expires: u64) -> Result<Reservation, StoreError> {
        Err(if self.full {
            StoreError::Full { capacity: 1 }
        } else {
            StoreError::Unavailable {
                retry_after: Some(Duration::from_secs(9)),
                source: "redis down".into(),
            }
        })
    }
    async fn consume(&self, _key: &NonceKey, _token: ClaimToken) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self, _key: &NonceKey, _token: ClaimToken) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A hook refusing after verification with a fixed response.
struct Refuse {
    status: u16,
    retry_after: Option<&'static str>,
}

#[async_trait]
impl PaymentHooks for Refuse {
    async fn after_verify(
        &self,
        _payment: &VerifiedPayment,
        _elapsed: Duration,
    ) -> Result<(), HookResponse> {
        let mut res = http::Response::builder().status(self.status);
        if let Some(secs) = self.retry_after {
            res = res.header("retry-after", secs);
        }
        Err(res.body(Bytes::from_static(b"{}")).expect("valid response"))
    }
}

// ------------------------------------------------------------------------------------------------
// Driving the layer

/// One request and what the layer answered.
struct Case {
    what: String,
    reply: Reply,
    /// `Retry-After` the backend asked for (else the layer's default of 5 s applies).
    backend_wait: Option<u64>,
    /// The settlement failed after the handler ran (a failed receipt is expected).
    settle_stage: bool,
}

struct Driver {
    clock: tower_x402::clock::FixedClock,
    cases: Vec<Case>,
}

impl Driver {
    fn new() -> Self {
        Self {
            clock: clock(),
            cases: Vec::new(),
        }
    }

    /// Sends one request with `headers` through a layer built by `configure`.
    async fn run(
        &mut self,
        what: impl Into<String>,
        configure: impl FnOnce(PaymentLayerBuilder) -> PaymentLayerBuilder,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> &Case {
        let svc = app(&Hits::new()).route_layer(
            configure(builder(&self.clock))
                .build()
                .expect("valid layer"),
        );
        let reply = get_with(&svc, "/paid", headers).await;
        self.cases.push(Case {
            what: what.into(),
            reply,
            backend_wait: None,
            settle_stage: false,
        });
        self.cases.last().expect("just pushed")
    }

    /// Like [`Driver::run`], noting what the backend asked to wait and the settlement stage.
    async fn run_with(
        &mut self,
        what: impl Into<String>,
        configure: impl FnOnce(PaymentLayerBuilder) -> PaymentLayerBuilder,
        headers: Vec<(HeaderName, HeaderValue)>,
        backend_wait: Option<u64>,
        settle_stage: bool,
    ) {
        self.run(what, configure, headers).await;
        let case = self.cases.last_mut().expect("just pushed");
        case.backend_wait = backend_wait;
        case.settle_stage = settle_stage;
    }
}

/// A v2 proof header whose JSON was changed by `edit` (the signature stays that of the
/// original, which the checks before verification never look at).
fn tampered(edit: impl FnOnce(&mut Value)) -> (HeaderName, HeaderValue) {
    let req = requirements();
    let mut v = v2_json(&req, &exact_payload(&payer(), &req, NOW), None);
    edit(&mut v);
    (HeaderName::from_static("payment-signature"), encode(&v))
}

fn v2_header(value: &'static str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static("payment-signature"),
        HeaderValue::from_static(value),
    )
}

/// Every `VerifyError` variant (an exhaustive list: `VerifyError` is `non_exhaustive`, so the
/// reason-literal check above is what notices a new variant's code).
fn verify_errors() -> Vec<(MakeVerifyError, Option<u64>)> {
    let e = |f: fn() -> VerifyError| (Arc::new(f) as MakeVerifyError, None);
    vec![
        e(|| VerifyError::Scheme("upto".into())),
        e(|| VerifyError::NetworkMismatch {
            paid: Network::BASE,
            required: Network::BASE_SEPOLIA,
        }),
        e(|| VerifyError::MissingEip712Domain),
        e(|| {
            VerifyError::InvalidPayload(serde_json::from_str::<u8>("{").expect_err("not a number"))
        }),
        e(|| VerifyError::RecipientMismatch {
            paid: Address::ZERO,
            required: PAY_TO,
        }),
        e(|| VerifyError::ValueMismatch {
            paid: U256::from(1),
            required: U256::from(1000),
        }),
        e(|| VerifyError::NotYetValid {
            valid_after: U256::from(NOW + 100),
        }),
        e(|| VerifyError::Expired {
            valid_before: U256::from(NOW),
        }),
        e(|| VerifyError::ValidityTooLong {
            valid_before: U256::from(NOW + 10_000),
            max: NOW + 300,
        }),
        e(|| VerifyError::Signature(SignatureError::HighS)),
        e(|| VerifyError::WrongSigner {
            recovered: Address::ZERO,
            expected: PAY_TO,
        }),
        e(|| VerifyError::ContractSignature { payer: PAY_TO }),
        e(|| VerifyError::FactoryNotAllowed {
            factory: Address::ZERO,
        }),
        e(|| VerifyError::Unavailable {
            retry_after: None,
            source: "down".into(),
        }),
        (
            Arc::new(|| VerifyError::Unavailable {
                retry_after: Some(Duration::from_secs(11)),
                source: "down".into(),
            }),
            Some(11),
        ),
        (
            Arc::new(|| VerifyError::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
            }),
            Some(7),
        ),
        e(|| VerifyError::RateLimited { retry_after: None }),
        e(|| VerifyError::Rejected {
            reason: tower_x402::rejection::Reason::from_wire("facilitator_rejected")
                .expect("a catalogued reason"),
            detail: "no".into(),
        }),
        e(|| VerifyError::Other {
            reason: tower_x402::rejection::Reason::from_wire("invalid_exact_evm_signature")
                .expect("a catalogued reason"),
        }),
    ]
}

/// Drives the layer into every refusal it can make; returns the answers.
async fn drive() -> Vec<Case> {
    let mut d = Driver::new();

    // Decoding.
    d.run("no payment", |b| b, vec![]).await;
    d.run("not base64", |b| b, vec![v2_header("%%%")]).await;
    d.run("base64 of not JSON", |b| b, vec![v2_header("aGVsbG8=")])
        .await;
    d.run("v1 and v2 headers", |b| b, vec![proof_v2(), proof_v1()])
        .await;
    d.run("repeated header", |b| b, vec![proof_v2(), proof_v2()])
        .await;
    d.run("too large", |b| b.max_header_bytes(64), vec![proof_v2()])
        .await;
    d.run(
        "v1 header with x402Version 2",
        |b| b,
        vec![(
            HeaderName::from_static("x-payment"),
            proof_v2().1, // a v2 document in the v1 header
        )],
    )
    .await;
    d.run(
        "v1 on a v2-only route",
        |b| b.versions(false, true),
        vec![proof_v1()],
    )
    .await;

    // Selection.
    d.run(
        "scheme not offered",
        |b| b,
        vec![tampered(|v| {
            v["accepted"]["scheme"] = json!("upto");
        })],
    )
    .await;
    d.run(
        "network not offered",
        |b| b,
        vec![tampered(|v| {
            v["accepted"]["network"] = json!("eip155:1");
        })],
    )
    .await;
    d.run(
        "amount not offered",
        |b| b,
        vec![tampered(|v| {
            v["accepted"]["amount"] = json!("999");
        })],
    )
    .await;

    d.run(
        "resource.url names another path",
        |b| b,
        vec![tampered(|v| {
            v["resource"] = json!({ "url": "http://api.test/elsewhere" });
        })],
    )
    .await;

    // Verification: the real verifier, then every error variant.
    d.run(
        "expired proof (real verifier)",
        |b| {
            b.verifier(
                ExactEvmVerifier::new()
                    .with_clock(tower_x402::clock::FixedClock::new(NOW + 100_000)),
            )
        },
        vec![proof_v2()],
    )
    .await;
    d.run(
        "payload not exact-EVM (real verifier)",
        |b| b,
        vec![tampered(|v| v["payload"] = json!({ "signature": 5 }))],
    )
    .await;
    for (make, wait) in verify_errors() {
        let what = format!("verifier: {}", make());
        d.run_with(
            what,
            move |b| b.verifier(Refusing(make)),
            vec![proof_v2()],
            wait,
            false,
        )
        .await;
    }
    for code in tower_x402::facilitator::wire::reason::KNOWN {
        d.run(
            format!("facilitator /verify refuses with {code}"),
            move |b| {
                b.verifier(Refusing(Arc::new(move || VerifyError::Rejected {
                    reason: Reason::from_wire(code).expect("KNOWN codes are catalogued"),
                    detail: String::new(),
                })))
            },
            vec![proof_v2()],
        )
        .await;
    }

    // Claiming.
    let proof = proof_v2();
    let svc = app(&Hits::new()).route_layer(builder(&d.clock).build().expect("layer"));
    let first = get_with(&svc, "/paid", [proof.clone()]).await;
    assert_eq!(first.status, StatusCode::OK);
    let replay = get_with(&svc, "/paid", [proof]).await;
    d.cases.push(Case {
        what: "replay".into(),
        reply: replay,
        backend_wait: None,
        settle_stage: false,
    });
    d.run_with(
        "nonce store down",
        |b| b.nonce_store(Down { full: false }),
        vec![proof_v2()],
        Some(9),
        false,
    )
    .await;
    d.run(
        "nonce store full",
        |b| b.nonce_store(Down { full: true }),
        vec![proof_v2()],
    )
    .await;
    d.run(
        "overloaded",
        |b| b.max_concurrent_verifications(0),
        vec![proof_v2()],
    )
    .await;

    // Settlement: pre-check and settle, every kind of failure.
    let mut refusals: Vec<Reason> = {
        use tower_x402::settle::onchain::reason::*;
        vec![
            INSUFFICIENT_FUNDS,
            INSUFFICIENT_BALANCE,
            NONCE_ALREADY_USED,
            VALID_BEFORE,
            VALID_AFTER,
            SIGNATURE,
            TRANSACTION_FAILED,
            INVALID_NETWORK,
            ASSET_NOT_DEPLOYED,
            FACTORY_NOT_ALLOWED,
            DEPLOYMENT_FAILED,
            UNDEPLOYED_SMART_WALLET,
        ]
    };
    let onchain_codes: Vec<String> = reason_consts("src/settle/onchain/mod.rs", "pub mod reason {")
        .into_values()
        .collect();
    assert!(
        onchain_codes
            .iter()
            .all(|c| refusals.iter().any(|r| r.as_str() == c)),
        "a new onchain::reason const: add it to this list ({onchain_codes:?})"
    );
    refusals.extend(
        tower_x402::facilitator::wire::reason::KNOWN
            .iter()
            .filter_map(|k| Reason::from_wire(k)),
    );
    for reason in refusals {
        let code = reason.clone();
        let refused: MakeSettleError = Arc::new(move || SettleError::Refused {
            reason: code.clone(),
            transaction: None,
        });
        let check = refused.clone();
        d.run(
            format!("settler check refuses: {reason}"),
            move |b| {
                b.settler(Failing {
                    check: Some(check),
                    settle: None,
                })
            },
            vec![proof_v2()],
        )
        .await;
        d.run_with(
            format!("settlement refused: {reason}"),
            move |b| {
                b.settler(Failing {
                    check: None,
                    settle: Some(refused),
                })
            },
            vec![proof_v2()],
            None,
            true,
        )
        .await;
    }
    let outages: Vec<(&str, MakeSettleError, Option<u64>)> = vec![
        (
            "unavailable",
            Arc::new(|| SettleError::Unavailable {
                retry_after: None,
                source: "rpc down".into(),
            }),
            None,
        ),
        (
            "rate-limited",
            Arc::new(|| SettleError::RateLimited {
                retry_after: Some(Duration::from_secs(3)),
            }),
            Some(3),
        ),
        (
            "outcome unknown",
            Arc::new(|| SettleError::Unknown {
                transaction: None,
                retry_after: Some(Duration::from_secs(12)),
                source: "no receipt".into(),
            }),
            Some(12),
        ),
    ];
    for (what, make, wait) in outages {
        let check = make.clone();
        d.run_with(
            format!("settler check {what}"),
            move |b| {
                b.settler(Failing {
                    check: Some(check),
                    settle: None,
                })
            },
            vec![proof_v2()],
            wait,
            false,
        )
        .await;
        d.run_with(
            format!("settlement {what}"),
            move |b| {
                b.settler(Failing {
                    check: None,
                    settle: Some(make),
                })
            },
            vec![proof_v2()],
            wait,
            true,
        )
        .await;
    }

    // Hooks.
    d.run(
        "hook refuses with 403",
        |b| {
            b.hook(Refuse {
                status: 403,
                retry_after: None,
            })
        },
        vec![proof_v2()],
    )
    .await;
    d.run_with(
        "hook refuses with 429",
        |b| {
            b.hook(Refuse {
                status: 429,
                retry_after: Some("60"),
            })
        },
        vec![proof_v2()],
        Some(60),
        false,
    )
    .await;
    d.cases
}

/// The reason the client reads: the challenge's `error` on 402, the JSON body's otherwise;
/// a hook's refusal carries it only in the extension.
fn sent_reason(reply: &Reply) -> Option<String> {
    let info = reply
        .rejection
        .as_ref()
        .expect("a PaymentRejection extension");
    if info.reason == Some(tower_x402::rejection::reason::REFUSED_BY_HOOK) {
        return info.reason.as_ref().map(|r| r.to_string());
    }
    let sent = reply.reason();
    assert_eq!(
        sent.as_deref(),
        info.reason.as_ref().map(|r| r.as_str()),
        "the extension and the response disagree"
    );
    // Both dialects carry the same reason (a v2-only route sends no v1 body).
    if reply.status == StatusCode::PAYMENT_REQUIRED
        && let Ok(v1) =
            serde_json::from_slice::<tower_x402::proto::v1::PaymentRequired>(&reply.body)
    {
        assert_eq!(v1.error, sent, "v1 body vs v2 header");
    }
    sent
}

#[tokio::test]
async fn every_answer_of_the_layer_matches_a_row_and_every_row_is_produced() {
    let rows = rows();
    let known: BTreeSet<&str> = tower_x402::facilitator::wire::reason::KNOWN
        .iter()
        .copied()
        .collect();
    let receipts = table(
        &docs(),
        "| Settlement failure | Status | Receipt `errorReason` |",
    );
    let mut covered: BTreeSet<(usize, String)> = BTreeSet::new();
    let mut receipt_rows_covered = BTreeSet::new();

    let cases = drive().await;
    assert!(cases.len() > 100, "{} cases", cases.len());
    for case in &cases {
        let reply = &case.reply;
        let what = &case.what;
        assert_ne!(reply.status, StatusCode::OK, "{what}: was served");
        assert_eq!(
            reply.header("cache-control"),
            Some("no-store"),
            "{what}: cache-control"
        );
        let info: &PaymentRejection = reply.rejection.as_ref().expect("extension");
        assert_eq!(info.status, reply.status, "{what}: extension status");
        let reason = sent_reason(reply);
        let retry_after = reply.header("retry-after").map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{what}: Retry-After {v:?}"))
        });
        assert_eq!(
            retry_after,
            info.retry_after.map(|d| d.as_secs()),
            "{what}: Retry-After header vs extension"
        );

        let matching: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| {
                let status_ok = match row.status {
                    Status::Code(c) => c == reply.status.as_u16(),
                    Status::Hook => true,
                };
                let reason_ok = match &reason {
                    None => row.reasons.is_empty() && !row.known,
                    Some(r) => row.reasons.contains(r) || (row.known && known.contains(r.as_str())),
                };
                let wait_ok = match row.retry_after {
                    RetryAfter::Yes => retry_after.is_some(),
                    RetryAfter::No => retry_after.is_none(),
                    RetryAfter::Hook => true,
                };
                status_ok && reason_ok && wait_ok
            })
            .map(|(i, _)| i)
            .collect();
        assert!(
            !matching.is_empty(),
            "{what}: {} {reason:?} Retry-After {retry_after:?} is in no row of the failure table",
            reply.status
        );
        for i in matching {
            covered.insert((i, reason.clone().unwrap_or_default()));
        }
        // `Retry-After` is the backend's wait when it gave one, else the default (5 s); a
        // hook's is its own.
        if retry_after.is_some()
            && info.reason != Some(tower_x402::rejection::reason::REFUSED_BY_HOOK)
        {
            assert_eq!(retry_after, Some(case.backend_wait.unwrap_or(5)), "{what}");
        }
        if let Some(wait) = case.backend_wait {
            assert_eq!(retry_after, Some(wait), "{what}: the backend's wait");
        }

        // Receipts: only settlement failures after the handler carry one.
        if case.settle_stage {
            let receipt = reply.receipt();
            assert_eq!(receipt["success"], json!(false), "{what}: {receipt}");
            let error = receipt["errorReason"].as_str().expect("errorReason");
            let row = receipts
                .iter()
                .position(|r| {
                    r[1] == reply.status.as_str()
                        && (codes(&r[2]).contains(error)
                            || (r[2].starts_with("the refusal's reason")
                                && Some(error) == reason.as_deref()))
                })
                .unwrap_or_else(|| panic!("{what}: receipt {} {error} is in no row", reply.status));
            receipt_rows_covered.insert(row);
        } else {
            assert!(reply.has_no_receipt(), "{what}: unexpected receipt");
        }
    }

    // Every listed (row, reason) was produced.
    for (i, row) in rows.iter().enumerate() {
        let listed: Vec<String> = if row.reasons.is_empty() {
            vec![String::new()]
        } else {
            row.reasons.iter().cloned().collect()
        };
        for reason in listed {
            assert!(
                covered.contains(&(i, reason.clone())),
                "row {:?} lists {reason:?} with status {:?}, but no request produced it",
                row.situation,
                row.status
            );
        }
        if row.known {
            for code in &known {
                assert!(
                    covered.contains(&(i, (*code).to_owned())),
                    "row {:?}: KNOWN code {code} not produced",
                    row.situation
                );
            }
        }
    }
    assert_eq!(
        receipt_rows_covered.len(),
        receipts.len(),
        "receipt rows produced: {receipt_rows_covered:?} of {receipts:?}"
    );
}
