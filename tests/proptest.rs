//! Property tests on the stable toolchain, over the same entry points and the same checks as
//! the fuzz targets (`fuzz/src/checks.rs`, compiled in here): the header decoder, the payload
//! parser and the whole layer. Case counts keep the file to a few seconds; `PROPTEST_CASES`
//! raises them for a longer run. The inputs kept under `fuzz/seeds/` and
//! `fuzz/regressions/` are replayed too.

#[allow(dead_code, unreachable_pub)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use checks::{Mode, flag};
use http::StatusCode;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower_x402::primitives::{Address, B256, Bytes, U256};
use tower_x402::proto::exact::{Authorization, ExactEvmPayload};
use tower_x402::proto::header::{PAYMENT_SIGNATURE, X_PAYMENT, decode_bytes, encode_json};
use tower_x402::proto::{PaymentPayload, v1, v2};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        // Failures are reported with their minimal input; no files are written in the repo.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// Strategies

/// Field names and values of the x402 messages, so generated JSON reaches the typed parsers.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "x402Version",
        "accepted",
        "payload",
        "resource",
        "url",
        "scheme",
        "network",
        "amount",
        "maxAmountRequired",
        "asset",
        "payTo",
        "maxTimeoutSeconds",
        "extra",
        "name",
        "version",
        "challenge",
        "signature",
        "authorization",
        "from",
        "to",
        "value",
        "validAfter",
        "validBefore",
        "nonce",
        "description",
        "accepts",
        "extensions",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            "exact",
            "eip155:84532",
            "base-sepolia",
            "1000",
            "0",
            "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
            "USDC",
            "2",
            "0x",
        ])
        .prop_map(Value::from),
        "[0-9a-fA-Fx:+-]{0,70}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.into(), v)).collect())),
        ]
    })
}

fn address() -> impl Strategy<Value = Address> {
    any::<[u8; 20]>().prop_map(Address::from)
}

fn u256() -> impl Strategy<Value = U256> {
    prop_oneof![
        any::<u64>().prop_map(U256::from),
        any::<[u8; 32]>().prop_map(U256::from_be_bytes),
    ]
}

fn exact_payload() -> impl Strategy<Value = ExactEvmPayload> {
    (
        prop::collection::vec(any::<u8>(), 0..100),
        address(),
        address(),
        u256(),
        u256(),
        u256(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(sig, from, to, value, valid_after, valid_before, nonce)| ExactEvmPayload {
                signature: Bytes::from(sig),
                authorization: Authorization {
                    from,
                    to,
                    value,
                    valid_after,
                    valid_before,
                    nonce: B256::from(nonce),
                },
            },
        )
}

// ------------------------------------------------------------------------------------------------
// Header decoder and payload parser

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn header_decode_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        checks::header(&bytes);
    }

    #[test]
    fn header_decode_never_panics_on_base64_text(text in "[A-Za-z0-9+/=_-]{0,800}") {
        checks::header(text.as_bytes());
    }

    #[test]
    fn payload_parser_never_panics_on_x402_shaped_json(doc in json_value()) {
        let json = serde_json::to_vec(&doc).unwrap();
        checks::payload(&json);
        checks::header(encode_json(&json).as_bytes());
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn header_size_cap_holds(extra in 0usize..64) {
        // Around the 8 KiB default: at the cap decodes, above it is refused before decoding.
        let len = 8 * 1024 - 32 + extra;
        let text = "A".repeat(len - len % 4);
        checks::header(text.as_bytes());
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn exact_payload_round_trips(p in exact_payload()) {
        let json = serde_json::to_vec(&p).unwrap();
        let back: ExactEvmPayload = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(&back, &p);
        let header = encode_json(&json);
        prop_assert_eq!(decode_bytes(&header, usize::MAX).unwrap(), json);
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// A valid signed payload, for any price and timeout, survives the header codec and the
    /// typed parsers unchanged, and verifies; in both protocol versions.
    #[test]
    fn valid_payload_round_trips_and_verifies(
        amount in 1u64..=u64::MAX,
        timeout in 1u64..100_000,
        nonce in any::<[u8; 32]>(),
    ) {
        let mut req = checks::requirements();
        req.amount = U256::from(amount);
        req.max_timeout_seconds = timeout;
        let payload = checks::signed(&req, B256::from(nonce));

        let header = encode_json(&serde_json::to_vec(&checks::v2_doc(&req, &payload)).unwrap());
        let json = decode_bytes(&header, 8 * 1024).unwrap();
        let v2: v2::PaymentPayload = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(&*v2.accepted, &req);
        let exact: ExactEvmPayload = serde_json::from_str(v2.payload.get()).unwrap();
        prop_assert_eq!(&exact, &payload);
        let verified = checks::verifier().verify_sync(&PaymentPayload::V2(v2), &req).unwrap();
        prop_assert_eq!(verified.payer, checks::payer());
        prop_assert_eq!(verified.amount, req.amount);

        let header = encode_json(&serde_json::to_vec(&checks::v1_doc(&payload)).unwrap());
        let v1: v1::PaymentPayload =
            serde_json::from_slice(&decode_bytes(&header, 8 * 1024).unwrap()).unwrap();
        let exact: ExactEvmPayload = serde_json::from_str(v1.payload.get()).unwrap();
        prop_assert_eq!(&exact, &payload);
        prop_assert!(checks::verifier().verify_sync(&PaymentPayload::V1(v1), &req).is_ok());
    }
}

// ------------------------------------------------------------------------------------------------
// The whole layer

proptest! {
    #![proptest_config(config(384))]

    /// Arbitrary header bytes (every mode of the fuzz target): never 200 without an
    /// independently valid proof, never a 5xx but 503, never the handler twice per proof.
    #[test]
    fn layer_on_arbitrary_headers(flags in any::<u8>(), rest in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut data = vec![flags];
        data.extend(rest);
        checks::layer(&data);
    }

    /// x402-shaped JSON in either header, bound or not.
    #[test]
    fn layer_on_x402_shaped_json(doc in json_value(), sel in 1u8.., bound in any::<bool>()) {
        let mut data = vec![Mode::Json.flag() | if bound { flag::BOUND } else { 0 }, sel];
        data.extend(serde_json::to_vec(&doc).unwrap());
        checks::layer(&data);
    }
}

/// A JSON pointer into the v2 document and what a mutation puts there.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value at the pointer.
    Set(&'static str, Value),
    /// Flip one bit of the hex string at the pointer (bit index modulo its length).
    FlipBit(&'static str, usize),
}

/// Fields the signature or the route's requirement covers: any change must be refused.
fn covered_mutation() -> impl Strategy<Value = Mutation> {
    let addr = || address().prop_map(|a| Value::from(a.to_checksum(None)));
    let uint = || u256().prop_map(|v| Value::from(v.to_string()));
    prop_oneof![
        "[a-z]{1,8}".prop_map(|s| Mutation::Set("/accepted/scheme", s.into())),
        (1u64..u64::MAX)
            .prop_map(|c| Mutation::Set("/accepted/network", format!("eip155:{c}").into())),
        uint().prop_map(|v| Mutation::Set("/accepted/amount", v)),
        addr().prop_map(|v| Mutation::Set("/accepted/asset", v)),
        addr().prop_map(|v| Mutation::Set("/accepted/payTo", v)),
        addr().prop_map(|v| Mutation::Set("/payload/authorization/from", v)),
        addr().prop_map(|v| Mutation::Set("/payload/authorization/to", v)),
        uint().prop_map(|v| Mutation::Set("/payload/authorization/value", v)),
        uint().prop_map(|v| Mutation::Set("/payload/authorization/validAfter", v)),
        uint().prop_map(|v| Mutation::Set("/payload/authorization/validBefore", v)),
        any::<usize>().prop_map(|i| Mutation::FlipBit("/payload/authorization/nonce", i)),
        any::<usize>().prop_map(|i| Mutation::FlipBit("/payload/signature", i)),
        any::<u8>().prop_map(|v| Mutation::Set("/x402Version", v.into())),
    ]
}

/// Echo fields the server never trusts (it verifies with its own requirement): changing them
/// changes nothing.
fn echo_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (1u64..1_000_000).prop_map(|v| Mutation::Set("/accepted/maxTimeoutSeconds", v.into())),
        "[ -~]{0,20}".prop_map(|s| Mutation::Set("/accepted/extra/name", s.into())),
        "[ -~]{0,20}".prop_map(|s| Mutation::Set("/accepted/extra/version", s.into())),
    ]
}

/// Applies `m` to `doc`; `false` when it changes nothing (a value equal to the original).
fn apply(doc: &mut Value, m: &Mutation) -> bool {
    match m {
        Mutation::Set(ptr, v) => {
            if doc.pointer(ptr).is_none() {
                // An optional top-level field the template lacks (`resource`).
                doc[ptr.trim_start_matches('/')] = Value::Null;
            }
            let slot = doc.pointer_mut(ptr).unwrap_or_else(|| panic!("{ptr}"));
            if slot == v {
                return false;
            }
            *slot = v.clone();
        }
        Mutation::FlipBit(ptr, i) => {
            let slot = doc.pointer_mut(ptr).unwrap_or_else(|| panic!("{ptr}"));
            let hex = slot.as_str().unwrap().trim_start_matches("0x");
            let mut bytes = tower_x402::primitives::hex::decode(hex).unwrap();
            let bit = i % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            *slot = format!("0x{}", tower_x402::primitives::hex::encode(bytes)).into();
        }
    }
    true
}

fn send_doc(doc: &Value, bound: bool) -> (StatusCode, bool) {
    let header = encode_json(&serde_json::to_vec(doc).unwrap());
    checks::send_once(&[(PAYMENT_SIGNATURE, header)], bound)
}

proptest! {
    #![proptest_config(config(256))]

    /// Any change to a signed or matched field of a valid proof: refused (never 200, handler
    /// never runs), and it no longer verifies.
    #[test]
    fn mutated_signed_payload_never_pays(m in covered_mutation(), bound in any::<bool>()) {
        let [unbound_doc, _, bound_doc] = checks::template_docs();
        let mut doc = if bound { bound_doc } else { unbound_doc };
        prop_assert_eq!(send_doc(&doc, bound), (StatusCode::OK, true), "the template pays");
        prop_assume!(apply(&mut doc, &m));
        let (status, ran) = send_doc(&doc, bound);
        prop_assert!(!ran, "{:?} bought the handler", m);
        prop_assert!(status == StatusCode::PAYMENT_REQUIRED || status == StatusCode::BAD_REQUEST, "{:?}: {}", m, status);
        // The verifier itself refuses every change to the signed payload; changes to the echo
        // (version, accepted) are refused earlier, by decoding and matching.
        let signed = matches!(&m, Mutation::Set(p, _) | Mutation::FlipBit(p, _) if p.starts_with("/payload"));
        if let (true, Ok(p)) = (signed, serde_json::from_value::<v2::PaymentPayload>(doc)) {
            prop_assert!(checks::verifier().verify_sync(&PaymentPayload::V2(p), &checks::requirements()).is_err());
        }
    }

    /// The echo fields the server does not trust: changing them does not change the outcome.
    #[test]
    fn mutated_echo_fields_change_nothing(m in echo_mutation(), bound in any::<bool>()) {
        let [unbound_doc, _, bound_doc] = checks::template_docs();
        let mut doc = if bound { bound_doc } else { unbound_doc };
        apply(&mut doc, &m);
        prop_assert_eq!(send_doc(&doc, bound), (StatusCode::OK, true), "{:?}", m);
    }

    /// The echoed `resource.url` (`ResourceCheck::Path`, the default): a proof naming another
    /// resource is refused before verification; the route's own path on any origin pays.
    #[test]
    fn the_echoed_resource_pays_only_its_own_path(
        url in "[ -~]{0,40}",
        origin in "https?://[a-z][a-z0-9.-]{0,12}(:[0-9]{1,4})?",
        bound in any::<bool>(),
    ) {
        let [unbound_doc, _, bound_doc] = checks::template_docs();
        let template = if bound { bound_doc } else { unbound_doc };
        let mut doc = template.clone();
        doc["resource"] = json!({ "url": url });
        let (status, ran) = send_doc(&doc, bound);
        prop_assert_eq!(status == StatusCode::OK, ran, "{}", url);
        prop_assert!(ran || status == StatusCode::PAYMENT_REQUIRED, "{}: {}", url, status);
        let path = url.split('#').next().unwrap_or_default();
        prop_assert!(!ran || path.ends_with("/paid"), "{:?} bought /paid", url);
        let mut doc = template;
        doc["resource"] = json!({ "url": format!("{origin}/paid") });
        prop_assert_eq!(send_doc(&doc, bound), (StatusCode::OK, true), "{}", origin);
    }
}

#[test]
fn v1_template_pays_unbound_only() {
    let [_, v1_doc, _] = checks::template_docs();
    let header = encode_json(&serde_json::to_vec(&v1_doc).unwrap());
    let headers = [(X_PAYMENT, header)];
    assert_eq!(checks::send_once(&headers, false), (StatusCode::OK, true));
    // A bound layer refuses v1 by default.
    assert_eq!(
        checks::send_once(&headers, true),
        (StatusCode::PAYMENT_REQUIRED, false)
    );
}

/// Found by the `layer` fuzz target: serde skips an unknown field's string without checking
/// its UTF-8, so a valid proof with invalid bytes there used to pay. JSON is UTF-8: 400.
#[test]
fn invalid_utf8_in_an_ignored_field_is_refused() {
    let [v2_doc, _, _] = checks::template_docs();
    let mut json = serde_json::to_vec(&v2_doc).unwrap();
    assert_eq!(json.pop(), Some(b'}'));
    json.extend_from_slice(b",\"note\":\"\xe3\"}");
    let headers = [(PAYMENT_SIGNATURE, encode_json(&json))];
    assert_eq!(
        checks::send_once(&headers, false),
        (StatusCode::BAD_REQUEST, false)
    );
    // The same document with valid UTF-8 there pays.
    let n = json.len();
    json[n - 3] = b'e';
    let headers = [(PAYMENT_SIGNATURE, encode_json(&json))];
    assert_eq!(checks::send_once(&headers, false), (StatusCode::OK, true));
}

// ------------------------------------------------------------------------------------------------
// Kept fuzz inputs

/// Every file under `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` passes its checks.
#[test]
fn kept_fuzz_inputs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for (target, check) in [
        ("header", checks::header as fn(&[u8])),
        ("payload", checks::payload),
        ("layer", checks::layer),
    ] {
        for kind in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in dir {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let ok = std::panic::catch_unwind(|| check(&data));
                assert!(ok.is_ok(), "{} fails", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "the seeds are missing: {seen} kept inputs");
}

/// The seed inputs of the fuzz targets, as `(target, file name, bytes)`: valid documents and
/// headers, so the fuzzer starts next to the paths that pay.
fn fuzz_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let docs = checks::template_docs().map(|d| serde_json::to_vec(&d).unwrap());
    for (doc, name) in docs.iter().zip(["v2", "v1", "v2-bound"]) {
        seeds.push(("payload", name.to_owned(), doc.clone()));
        seeds.push(("header", name.to_owned(), STANDARD.encode(doc).into_bytes()));
        // Selector: odd is X-PAYMENT, even PAYMENT-SIGNATURE (0 would be the separator).
        let mut json_mode = vec![Mode::Json.flag(), if name == "v1" { 1 } else { 2 }];
        if name == "v2-bound" {
            json_mode[0] |= flag::BOUND;
        }
        json_mode.extend(doc);
        seeds.push(("layer", format!("json-{name}"), json_mode));
    }
    for (mode, name) in [
        (Mode::TemplateV2, "tmpl-v2"),
        (Mode::TemplateV1, "tmpl-v1"),
        (Mode::TemplateBound, "tmpl-v2-bound"),
    ] {
        let bound = if mode == Mode::TemplateBound {
            flag::BOUND
        } else {
            0
        };
        seeds.push((
            "layer",
            name.to_owned(),
            vec![mode.flag() | bound | flag::TWICE],
        ));
    }
    seeds.push((
        "layer",
        "tmpl-v1-bound-unbound-v1".to_owned(),
        vec![Mode::TemplateV1.flag() | flag::BOUND | flag::UNBOUND_V1],
    ));
    let challenge = serde_json::to_vec(&json!({
        "x402Version": 2,
        "resource": { "url": checks::URL },
        "accepts": [checks::requirements()],
    }))
    .unwrap();
    seeds.push(("payload", "challenge".to_owned(), challenge));
    seeds
}

/// `fuzz/seeds/` holds what [`fuzz_seeds`] makes today: the same files, each passing its
/// target's checks, with the same bytes but for a bound document's challenge id (its salt is
/// random). When the message formats change, rewrite them with
/// `X402_WRITE_FUZZ_SEEDS=1 cargo test --all-features --test proptest fuzz_seeds`.
#[test]
fn fuzz_seeds_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let seeds = fuzz_seeds();
    if std::env::var_os("X402_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, data) in &seeds {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
    let mut made: Vec<String> = seeds.iter().map(|(t, n, _)| format!("{t}/{n}")).collect();
    made.sort();
    let mut kept = Vec::new();
    for target in ["header", "layer", "payload"] {
        for entry in std::fs::read_dir(root.join(target)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            kept.push(format!("{target}/{name}"));
        }
    }
    kept.sort();
    assert_eq!(made, kept, "fuzz/seeds/ is not what fuzz_seeds() makes");
    for (target, name, data) in &seeds {
        let check = match *target {
            "header" => checks::header as fn(&[u8]),
            "payload" => checks::payload,
            _ => checks::layer,
        };
        check(data);
        // A document with a challenge id differs in the id's random salt only.
        if !name.contains("bound") || name.starts_with("tmpl") {
            let file = std::fs::read(root.join(target).join(name)).unwrap();
            assert_eq!(&file, data, "fuzz/seeds/{target}/{name} is out of date");
        }
    }
}
