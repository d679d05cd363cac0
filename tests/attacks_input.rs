//! Red-team batch 2 (issue #23, item 5), hostile input: smuggled and repeated headers,
//! non-canonical encodings of one authorization, doctored echoes and domains, oversized and
//! deeply nested documents, and junk that must leave no state behind. Each attack asserts
//! the status it gets and how often the handler ran; encodings of one authorization must
//! never buy more than one run. Every proof signs the requirement the server's 402 offered.
#![cfg(all(feature = "test-util", feature = "axum"))]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_x402::MemoryNonceStore;
use tower_x402::primitives::{Address, U256};
use tower_x402::proto::header::{PAYMENT_SIGNATURE, X_PAYMENT};
use tower_x402::proto::v2::{PaymentRequired, PaymentRequirements};
use tower_x402::test_util::{PrivateKeySigner, encode, exact_payload, sign, v1_json};

/// The 402 `svc` answers for `/paid` without payment.
async fn offer<S, B>(svc: &S) -> PaymentRequired
where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    let r = get_with(svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    r.challenge()
}

/// The v2 document an official client sends for `offer.accepts[0]`, signed at `now`.
fn paying(offer: &PaymentRequired, now: u64) -> Value {
    let req = &offer.accepts[0];
    json!({
        "x402Version": 2,
        "resource": offer.resource,
        "accepted": req,
        "payload": exact_payload(&payer(), req, now),
    })
}

/// Base64 of `text` as a header value, whatever `text` is.
fn raw(text: &str) -> HeaderValue {
    HeaderValue::try_from(STANDARD.encode(text)).unwrap()
}

/// A paid route with its own replay guard (returned, to inspect).
fn paid_app(hits: &Hits) -> (axum::Router, MemoryNonceStore) {
    let clock = clock();
    let store = MemoryNonceStore::with_capacity_and_clock(10_000, clock.clone());
    let svc = app(hits).route_layer(builder(&clock).nonce_store(store.clone()).build().unwrap());
    (svc, store)
}

/// A refusal of bad input: 4xx with a reason, never a 5xx, never cacheable.
fn client_error(r: &Reply, what: &str) {
    assert!(r.status.is_client_error(), "{what}: {:?}", r.outcome());
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
}

// ------------------------------------------------------------------------------------------------
// Smuggling

#[tokio::test]
async fn a_payment_header_repeated_joined_or_in_both_dialects_is_refused_and_stays_unspent() {
    // Two proofs where a proxy or a lax parser would pick one and the layer another: the
    // request is refused outright, and neither proof is consumed.
    let hits = Hits::new();
    let (svc, store) = paid_app(&hits);
    let o = offer(&svc).await;
    let (a, b) = (paying(&o, NOW), paying(&o, NOW));
    let (ea, eb) = (encode(&a), encode(&b));
    let v1 = encode(&v1_json(
        &o.accepts[0],
        &serde_json::from_value(b["payload"].clone()).unwrap(),
    ));
    let joined = HeaderValue::try_from(format!(
        "{}, {}",
        ea.to_str().unwrap(),
        eb.to_str().unwrap()
    ))
    .unwrap();
    let cases: Vec<(&str, Vec<(HeaderName, HeaderValue)>)> = vec![
        (
            "repeated v2",
            vec![
                (PAYMENT_SIGNATURE, ea.clone()),
                (PAYMENT_SIGNATURE, eb.clone()),
            ],
        ),
        (
            "repeated v1",
            vec![(X_PAYMENT, v1.clone()), (X_PAYMENT, v1.clone())],
        ),
        (
            "both dialects",
            vec![(PAYMENT_SIGNATURE, ea.clone()), (X_PAYMENT, v1.clone())],
        ),
        ("comma-joined", vec![(PAYMENT_SIGNATURE, joined)]),
    ];
    for (what, headers) in cases {
        let r = get_with(&svc, "/paid", headers).await;
        client_error(&r, what);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}");
    }
    assert_eq!((hits.get(), store.len()), (0, 0));
    // Both proofs still pay, once each.
    for e in [ea, eb] {
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, e)]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn non_canonical_numbers_in_one_authorization_buy_at_most_one_run() {
    // The signature covers the numbers, not their spelling: floats, exponents, signs, leading
    // zeros, hex and JSON numbers for `value` and `validBefore` must never buy a second run.
    // Decoding is strict (decimal strings only), so each is refused 400 outright.
    let hits = Hits::new();
    let (svc, _) = paid_app(&hits);
    let o = offer(&svc).await;
    let v = paying(&o, NOW);
    let value = v["payload"]["authorization"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = v["payload"]["authorization"]["validBefore"]
        .as_str()
        .unwrap()
        .to_owned();
    let spell = |n: &str| -> Vec<Value> {
        let int: u64 = n.parse().unwrap();
        vec![
            json!(format!("{n}.0")),
            json!(format!("{}e{}", &n[..1], n.len() - 1)),
            json!(format!("-{n}")),
            json!(format!("+{n}")),
            json!(format!("0{n}")),
            json!(format!("00{n}")),
            json!(format!(" {n}")),
            json!(format!("0x{int:x}")),
            json!(int),
            json!(int as f64),
            json!(format!("{n}\u{0}")),
        ]
    };
    for (field, n) in [("value", &value), ("validBefore", &before)] {
        for spelled in spell(n) {
            let mut d = v.clone();
            d["payload"]["authorization"][field] = spelled.clone();
            let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
            client_error(&r, &format!("{field} = {spelled}"));
            assert_eq!(
                r.outcome(),
                (StatusCode::BAD_REQUEST, Some("invalid_payload".into())),
                "{field} = {spelled}"
            );
        }
    }
    assert_eq!(hits.get(), 0);
    let canonical = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&v))]).await;
    assert_eq!(
        canonical.status,
        StatusCode::OK,
        "the refusals spent nothing"
    );
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn case_variants_of_one_proofs_addresses_buy_one_run() {
    // `from`, `to`, the nonce and the echo's `payTo`/`asset` in lower, upper and wrongly
    // checksummed case are one payer, one payee and one nonce: one run at most, whatever
    // the spelling.
    let hits = Hits::new();
    let (svc, _) = paid_app(&hits);
    let o = offer(&svc).await;
    let v = paying(&o, NOW);
    let spellings = |s: &str| -> Vec<String> {
        let hex = s.trim_start_matches("0x");
        vec![
            format!("0x{}", hex.to_lowercase()),
            format!("0x{}", hex.to_uppercase()),
            format!("0X{}", hex.to_lowercase()),
            // Mixed case that is not the EIP-55 checksum.
            format!(
                "0x{}",
                hex.chars()
                    .enumerate()
                    .map(|(i, c)| if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    })
                    .collect::<String>()
            ),
        ]
    };
    let fields: [&[&str]; 5] = [
        &["payload", "authorization", "from"],
        &["payload", "authorization", "to"],
        &["payload", "authorization", "nonce"],
        &["accepted", "payTo"],
        &["accepted", "asset"],
    ];
    let mut served = 0;
    for path in fields {
        let original = path
            .iter()
            .fold(&v, |d, k| &d[*k])
            .as_str()
            .unwrap()
            .to_owned();
        for s in spellings(&original) {
            let mut d = v.clone();
            let mut slot = &mut d;
            for k in path {
                slot = &mut slot[*k];
            }
            *slot = json!(s);
            let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
            if r.status == StatusCode::OK {
                served += 1;
            } else {
                client_error(&r, &format!("{path:?} = {s}"));
            }
        }
    }
    assert!(served <= 1, "{served} runs for one authorization");
    let canonical = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&v))]).await;
    assert_eq!(canonical.status == StatusCode::OK, served == 0);
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn unicode_escaped_fields_are_the_same_spent_proof() {
    // JSON escapes spell the same strings: `\u0065xact` is `exact`. The escaped document may
    // pay, but it is the same authorization as the plain one.
    let hits = Hits::new();
    let (svc, _) = paid_app(&hits);
    let o = offer(&svc).await;
    let v = paying(&o, NOW);
    let text = v.to_string();
    let nonce = v["payload"]["authorization"]["nonce"].as_str().unwrap();
    let escaped = text
        .replace("\"exact\"", "\"\\u0065xact\"")
        .replace("\"eip155:84532\"", "\"eip155:\\u00384532\"")
        .replace(nonce, &format!("\\u0030x{}", &nonce[2..]));
    assert_ne!(escaped, text);
    let first = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, raw(&escaped))]).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.reason());
    let plain = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&v))]).await;
    assert_eq!(plain.reason().as_deref(), Some(NONCE_USED));
    let again = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, raw(&escaped))]).await;
    assert_eq!(again.reason().as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 1);
}

// ------------------------------------------------------------------------------------------------
// Doctored echoes and domains (serve unpaid, drain the relayer)

#[tokio::test]
async fn a_proof_paying_the_attacker_or_less_than_the_price_is_refused() {
    // The echo copies the server's requirement; the signed authorization pays someone else,
    // pays less, or pays the right amount of another token. The server checks the signed
    // authorization against its own requirement, never the echo.
    let hits = Hits::new();
    let (svc, store) = paid_app(&hits);
    let o = offer(&svc).await;
    let req = o.accepts[0].clone();
    let attacker = Address::repeat_byte(0xa7);
    let tweaks: Vec<(&str, PaymentRequirements)> = vec![
        ("payTo", {
            let mut r = req.clone();
            r.pay_to = attacker.into();
            r
        }),
        ("amount", {
            let mut r = req.clone();
            r.amount -= U256::from(1);
            r
        }),
        ("asset", {
            let mut r = req.clone();
            r.asset = Address::repeat_byte(0x70).into();
            r
        }),
    ];
    for (what, signed_for) in tweaks {
        let payload = exact_payload(&payer(), &signed_for, NOW);
        // The honest echo of the server's requirement, the doctored authorization.
        let d = json!({ "x402Version": 2, "resource": o.resource, "accepted": req, "payload": payload });
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
        assert_eq!(
            r.status,
            StatusCode::PAYMENT_REQUIRED,
            "{what}: {:?}",
            r.reason()
        );
        // And the doctored echo too.
        let d = json!({ "x402Version": 2, "resource": o.resource, "accepted": signed_for, "payload": payload });
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
        assert_eq!(
            r.status,
            StatusCode::PAYMENT_REQUIRED,
            "{what}: {:?}",
            r.reason()
        );
    }
    assert_eq!((hits.get(), store.len()), (0, 0));
}

#[tokio::test]
async fn a_proof_signed_under_a_doctored_eip712_domain_is_refused_before_the_handler() {
    // Signed for another token name/version or another chain than the route's: the token
    // contract would revert the transfer (the relayer would pay for a failed transaction),
    // so the layer must refuse it first, whatever the echo's `extra` or `network` claims.
    let hits = Hits::new();
    let (svc, store) = paid_app(&hits);
    let o = offer(&svc).await;
    let req = o.accepts[0].clone();
    let mut domains = Vec::new();
    for (k, val) in [("name", "Fake USD"), ("version", "9")] {
        let mut r = req.clone();
        r.extra
            .get_or_insert_with(Default::default)
            .insert(k.into(), json!(val));
        domains.push(r);
    }
    let mut mainnet = req.clone();
    mainnet.network = tower_x402::Network::BASE;
    domains.push(mainnet);
    for signed_for in domains {
        let mut payload = exact_payload(&payer(), &req, NOW);
        payload.signature = sign(&payer(), &signed_for, &payload.authorization);
        for echo in [&req, &signed_for] {
            let d = json!({ "x402Version": 2, "resource": o.resource, "accepted": echo, "payload": payload });
            let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
            assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{:?}", r.reason());
        }
    }
    assert_eq!((hits.get(), store.len()), (0, 0));
}

// ------------------------------------------------------------------------------------------------
// Exhaust memory

#[tokio::test]
async fn deeply_nested_or_oversized_headers_are_4xx_never_a_crash() {
    let hits = Hits::new();
    let (svc, store) = paid_app(&hits);
    let o = offer(&svc).await;
    let v = paying(&o, NOW);
    let mut cases: Vec<(String, HeaderValue)> = Vec::new();
    // 3000 levels of nesting in a field the layer ignores, within the 8 KiB header cap.
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let deep = format!("{}1{}", open.repeat(1500), close.repeat(1500));
        let text = v.to_string();
        let doc = format!(
            "{},\"extensions\":{{\"x\":{deep}}}}}",
            &text[..text.len() - 1]
        );
        cases.push((format!("nested {open}"), raw(&doc)));
    }
    // A huge header, a huge string inside a small-looking one, junk base64.
    cases.push(("64 KiB".into(), raw(&"A".repeat(64 * 1024))));
    let mut big = v.clone();
    big["payload"]["signature"] = json!(format!("0x{}", "ab".repeat(3000)));
    cases.push(("long signature".into(), encode(&big)));
    cases.push((
        "not base64".into(),
        HeaderValue::from_static("!!!!not-base64!!!!"),
    ));
    cases.push(("base64 of nothing".into(), HeaderValue::from_static("")));
    for (what, value) in cases {
        let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, value)]).await;
        client_error(&r, &what);
    }
    assert_eq!((hits.get(), store.len()), (0, 0));
}

#[tokio::test]
async fn many_distinct_invalid_proofs_leave_nothing_in_the_replay_guard() {
    // 60 rounds of proofs that each fail a different check, each with a fresh nonce: the
    // replay guard holds only what verified (nothing here), so junk cannot fill it.
    let hits = Hits::new();
    let (svc, store) = paid_app(&hits);
    let o = offer(&svc).await;
    let stranger = PrivateKeySigner::random();
    for round in 0..60u64 {
        let mut bad: Vec<Value> = Vec::new();
        // Signed by a key other than `from`.
        let mut d = paying(&o, NOW);
        d["payload"]["authorization"]["from"] = json!(stranger.address());
        bad.push(d);
        // Expired, not yet valid, valid for a century.
        for (field, at) in [
            ("validBefore", NOW - round - 1),
            ("validAfter", NOW + 3600 + round),
            ("validBefore", NOW + 100 * 365 * 86_400),
        ] {
            let mut d = paying(&o, NOW);
            d["payload"]["authorization"][field] = json!(at.to_string());
            let auth = serde_json::from_value(d["payload"]["authorization"].clone()).unwrap();
            d["payload"]["signature"] = json!(sign(&payer(), &o.accepts[0], &auth));
            bad.push(d);
        }
        // A signature of the wrong length.
        let mut d = paying(&o, NOW);
        d["payload"]["signature"] = json!("0x1234");
        bad.push(d);
        for d in bad {
            let r = get_with(&svc, "/paid", [(PAYMENT_SIGNATURE, encode(&d))]).await;
            client_error(&r, &d["payload"]["authorization"].to_string());
        }
    }
    assert_eq!((hits.get(), store.len()), (0, 0));
}

// ------------------------------------------------------------------------------------------------
// Poison a cache

#[tokio::test]
async fn a_challenge_cached_for_one_host_or_path_is_never_sent_for_another() {
    // The layer keeps a few encoded 402s per thread. Interleave more hosts and paths than it
    // has slots (the Host header is the attacker's): every 402 must name its own request's
    // URL and price, or a client would sign for the attacker's resource.
    let hits = Hits::new();
    let clock = clock();
    let dear =
        tower_x402::PaymentOption::exact(&tower_x402::Asset::usdc_base_sepolia(), "$0.01", PAY_TO)
            .unwrap();
    let (dear, cheap): (std::sync::Arc<[_]>, std::sync::Arc<[_]>) =
        (vec![dear].into(), vec![option()].into());
    let svc = app(&hits).layer(
        unpriced_builder(&clock)
            .pricing(move |parts: &http::request::Parts| {
                Some(if parts.uri.path().starts_with("/premium") {
                    dear.clone()
                } else {
                    cheap.clone()
                })
            })
            .build()
            .unwrap(),
    );
    for round in 0..3 {
        for i in 0..12 {
            let host = if i % 2 == 0 {
                "api.test"
            } else {
                "evil.example"
            };
            let path = format!(
                "/{}?v={}",
                if i % 3 == 0 { "premium" } else { "paid" },
                i % 5
            );
            let mut req = http::Request::get(path.clone())
                .body(axum::body::Body::empty())
                .unwrap();
            req.headers_mut()
                .insert("host", HeaderValue::from_static(host));
            let r = send(&svc, req).await;
            assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{round}/{i}");
            let c = r.challenge();
            assert_eq!(
                c.resource.url,
                format!("http://{host}{path}"),
                "{round}/{i}"
            );
            let want = if path.starts_with("/premium") {
                10_000u64
            } else {
                1000
            };
            assert_eq!(c.accepts[0].amount, U256::from(want), "{round}/{i}");
            assert_eq!(r.v1_challenge().accepts[0].resource, c.resource.url);
        }
    }
    assert_eq!(hits.get(), 0);
}
