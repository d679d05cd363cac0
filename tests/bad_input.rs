//! Hostile and broken payment headers: one table, each case a valid signed payment with one
//! thing tampered. Every case must be refused with the exact (status, reason) of the rejection
//! table ([`tower_x402::rejection`]): never 200, never 5xx, and the handler never runs.
#![cfg(feature = "test-util")]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
use common::*;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower::Layer;
use tower_x402::primitives::{Address, Bytes, U256, address};
use tower_x402::proto::exact::{Authorization, ExactEvmPayload};
use tower_x402::proto::header::{PAYMENT_SIGNATURE, X_PAYMENT};
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::test_util::{
    PrivateKeySigner, authorization, encode, exact_payload, sign, v1_json, v2_json,
};
use tower_x402::{Asset, PaymentOption};

const PAYMENT_REQUIRED: StatusCode = StatusCode::PAYMENT_REQUIRED;
const BAD_REQUEST: StatusCode = StatusCode::BAD_REQUEST;
const TOO_LARGE: StatusCode = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;

const INVALID_PAYLOAD: &str = "invalid_payload";
const INVALID_VERSION: &str = "invalid_x402_version";
const INVALID_NETWORK: &str = "invalid_network";
const UNSUPPORTED_SCHEME: &str = "unsupported_scheme";
const INVALID_REQUIREMENTS: &str = "invalid_payment_requirements";
const BAD_SIGNATURE: &str = "invalid_exact_evm_signature";
const BAD_VALUE: &str = "invalid_exact_evm_authorization_value";
const BAD_RECIPIENT: &str = "invalid_exact_evm_recipient_mismatch";
const BAD_VALID_BEFORE: &str = "invalid_exact_evm_payload_authorization_valid_before";
const BAD_VALID_AFTER: &str = "invalid_exact_evm_payload_authorization_valid_after";

/// secp256k1 group order n.
const N: U256 = U256::from_be_bytes([
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
]);
/// 2^256: one more than a uint256 holds (78 digits).
const TWO_POW_256: &str =
    "115792089237316195423570985008687907853269984665640564039457584007913129639936";
const OTHER: Address = address!("0x000000000000000000000000000000000000dEaD");

type Headers = Vec<(HeaderName, HeaderValue)>;

struct Case {
    name: &'static str,
    headers: Headers,
    status: StatusCode,
    reason: &'static str,
}

// ------------------------------------------------------------------------------------------------
// Building tampered requests from a valid one

fn req() -> PaymentRequirements {
    requirements()
}

fn signed() -> ExactEvmPayload {
    exact_payload(&payer(), &req(), NOW)
}

/// A valid v2 document, fresh nonce.
fn doc_v2() -> Value {
    v2_json(&req(), &signed(), None)
}

/// A valid v1 document, fresh nonce.
fn doc_v1() -> Value {
    v1_json(&req(), &signed())
}

fn in_v2(value: HeaderValue) -> Headers {
    vec![(PAYMENT_SIGNATURE, value)]
}

fn in_v1(value: HeaderValue) -> Headers {
    vec![(X_PAYMENT, value)]
}

/// A valid v2 document with `f` applied.
fn v2(f: impl FnOnce(&mut Value)) -> Headers {
    let mut d = doc_v2();
    f(&mut d);
    in_v2(encode(&d))
}

/// A valid v1 document with `f` applied.
fn v1(f: impl FnOnce(&mut Value)) -> Headers {
    let mut d = doc_v1();
    f(&mut d);
    in_v1(encode(&d))
}

/// A v2 payment whose authorization is changed by `f` and then signed (correctly) by `signer`
/// under the domain of `domain`: the tampered field is the only defect unless the test
/// changes signer or domain on purpose.
fn resigned_with(
    signer: &PrivateKeySigner,
    domain: &PaymentRequirements,
    accepted: &PaymentRequirements,
    f: impl FnOnce(&mut Authorization),
) -> Value {
    let mut auth = authorization(accepted, payer().address(), NOW);
    f(&mut auth);
    let signature = sign(signer, domain, &auth);
    v2_json(
        accepted,
        &ExactEvmPayload {
            signature,
            authorization: auth,
        },
        None,
    )
}

/// The authorization changed by `f`, re-signed by the payer.
fn resigned(f: impl FnOnce(&mut Authorization)) -> Headers {
    in_v2(encode(&resigned_with(&payer(), &req(), &req(), f)))
}

/// The same, in v1.
fn resigned_v1(f: impl FnOnce(&mut Authorization)) -> Headers {
    let r = req();
    let mut auth = authorization(&r, payer().address(), NOW);
    f(&mut auth);
    let signature = sign(&payer(), &r, &auth);
    in_v1(encode(&v1_json(
        &r,
        &ExactEvmPayload {
            signature,
            authorization: auth,
        },
    )))
}

/// A valid payment whose signature bytes are changed by `f`.
fn sig(f: impl FnOnce(&mut Vec<u8>)) -> Headers {
    let mut p = signed();
    let mut bytes = p.signature.to_vec();
    f(&mut bytes);
    p.signature = Bytes::from(bytes);
    in_v2(encode(&v2_json(&req(), &p, None)))
}

/// Raw bytes as the header value.
fn raw(bytes: &[u8]) -> Headers {
    in_v2(HeaderValue::from_bytes(bytes).expect("a legal header value"))
}

/// Standard base64 of arbitrary bytes.
fn b64(bytes: &[u8]) -> Headers {
    in_v2(HeaderValue::try_from(STANDARD.encode(bytes)).unwrap())
}

/// Compact JSON text of a valid v2 document.
fn text_v2() -> String {
    serde_json::to_string(&doc_v2()).unwrap()
}

/// Replaces the first `from` in the valid v2 JSON text by `to` (asserting it was there).
fn edit_text(from: &str, to: &str) -> Headers {
    let text = text_v2();
    assert!(text.contains(from), "{from} not in {text}");
    b64(text.replacen(from, to, 1).as_bytes())
}

/// `"key":` prepended to the top-level object: a duplicate of an existing key.
fn duplicate_top_level(key: &str, value: &Value) -> Headers {
    let text = text_v2();
    b64(format!("{{\"{key}\":{value},{}", &text[1..]).as_bytes())
}

fn high_s(bytes: &mut [u8]) {
    let s = U256::from_be_slice(&bytes[32..64]);
    bytes[32..64].copy_from_slice(&(N - s).to_be_bytes::<32>());
    bytes[64] = if bytes[64] == 27 { 28 } else { 27 };
}

/// A valid payment encoded in URL-safe base64 (padded to contain `-` or `_`).
fn url_safe() -> Headers {
    let mut d = doc_v2();
    for pad in 0.. {
        d["extensions"] = json!({ "pad": "?".repeat(pad) });
        let json = serde_json::to_vec(&d).unwrap();
        if STANDARD.encode(&json).contains(['+', '/']) {
            return in_v2(HeaderValue::try_from(URL_SAFE.encode(&json)).unwrap());
        }
    }
    unreachable!()
}

/// A valid payment in standard base64 without its `=` padding.
fn unpadded() -> Headers {
    let mut d = doc_v2();
    for pad in 0.. {
        d["extensions"] = json!({ "pad": "x".repeat(pad) });
        let json = serde_json::to_vec(&d).unwrap();
        if !json.len().is_multiple_of(3) {
            assert!(STANDARD.encode(&json).ends_with('='));
            return in_v2(HeaderValue::try_from(STANDARD_NO_PAD.encode(&json)).unwrap());
        }
    }
    unreachable!()
}

/// A valid payment with `insert` placed in the middle of its base64.
fn base64_with(insert: &str) -> Headers {
    let mut s = STANDARD.encode(serde_json::to_vec(&doc_v2()).unwrap());
    s.insert_str(s.len() / 2, insert);
    in_v2(HeaderValue::try_from(s).unwrap())
}

fn other_key() -> PrivateKeySigner {
    // Anvil account #3.
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
        .parse()
        .unwrap()
}

/// The default requirements with `f` applied (to sign under another domain, or echo).
fn req_with(f: impl FnOnce(&mut PaymentRequirements)) -> PaymentRequirements {
    let mut r = req();
    f(&mut r);
    r
}

fn padded_over_limit() -> Headers {
    v2(|d| d["extensions"] = json!({ "pad": "x".repeat(7_000) }))
}

// ------------------------------------------------------------------------------------------------
// The table

fn cases() -> Vec<Case> {
    let case = |name, headers, status, reason| Case {
        name,
        headers,
        status,
        reason,
    };
    let valid_accepted = serde_json::to_string(&req()).unwrap();
    let valid_payload = serde_json::to_string(&signed()).unwrap();
    let mainnet = PaymentOption::exact(&Asset::usdc_base(), "$0.001", PAY_TO).unwrap();
    vec![
        // -- The echoed requirements (`accepted`) are not what the route offers.
        case(
            "accepted.network is Base mainnet",
            v2(|d| d["accepted"]["network"] = json!("eip155:8453")),
            PAYMENT_REQUIRED,
            INVALID_NETWORK,
        ),
        case(
            "accepted.network is another namespace",
            v2(|d| d["accepted"]["network"] = json!("bip122:000000000019d6689c085ae165831e93")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.network has a leading zero",
            v2(|d| d["accepted"]["network"] = json!("eip155:084532")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.network is a v1 name in v2",
            v2(|d| d["accepted"]["network"] = json!("base-sepolia")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted is mainnet USDC, not offered",
            v2(|d| d["accepted"] = json!(mainnet.requirements())),
            PAYMENT_REQUIRED,
            INVALID_NETWORK,
        ),
        case(
            "accepted.asset is another token",
            v2(|d| d["accepted"]["asset"] = json!(OTHER)),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted.payTo is someone else",
            v2(|d| d["accepted"]["payTo"] = json!(OTHER)),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted.amount too low",
            v2(|d| d["accepted"]["amount"] = json!("999")),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted.amount too high",
            v2(|d| d["accepted"]["amount"] = json!("1001")),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted.amount zero",
            v2(|d| d["accepted"]["amount"] = json!("0")),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted: other asset, payTo and amount (requirements never offered)",
            v2(|d| {
                d["accepted"]["asset"] = json!(OTHER);
                d["accepted"]["payTo"] = json!(OTHER);
                d["accepted"]["amount"] = json!("1");
            }),
            PAYMENT_REQUIRED,
            INVALID_REQUIREMENTS,
        ),
        case(
            "accepted.scheme unknown (upto)",
            v2(|d| d["accepted"]["scheme"] = json!("upto")),
            PAYMENT_REQUIRED,
            UNSUPPORTED_SCHEME,
        ),
        case(
            "accepted.scheme in upper case",
            v2(|d| d["accepted"]["scheme"] = json!("EXACT")),
            PAYMENT_REQUIRED,
            UNSUPPORTED_SCHEME,
        ),
        case(
            "accepted echoes a longer maxTimeoutSeconds and the proof uses it",
            in_v2(encode(&resigned_with(
                &payer(),
                &req(),
                &req_with(|r| r.max_timeout_seconds = 86_400),
                |_| (),
            ))),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        case(
            "accepted missing",
            v2(|d| _ = d.as_object_mut().unwrap().remove("accepted")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- Amount and value encodings.
        case(
            "accepted.amount negative",
            v2(|d| d["accepted"]["amount"] = json!("-1000")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount hex",
            v2(|d| d["accepted"]["amount"] = json!("0x3e8")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount as a JSON number",
            v2(|d| d["accepted"]["amount"] = json!(1000)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount with a leading zero",
            v2(|d| d["accepted"]["amount"] = json!("01000")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount with an exponent",
            v2(|d| d["accepted"]["amount"] = json!("1e3")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount with a space",
            v2(|d| d["accepted"]["amount"] = json!(" 1000")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount 2^256 (78 digits)",
            v2(|d| d["accepted"]["amount"] = json!(TWO_POW_256)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.amount of 4000 digits",
            v2(|d| d["accepted"]["amount"] = json!("9".repeat(4000))),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.maxTimeoutSeconds 1e400",
            edit_text("\"maxTimeoutSeconds\":300", "\"maxTimeoutSeconds\":1e400"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "accepted.maxTimeoutSeconds above u64",
            edit_text(
                "\"maxTimeoutSeconds\":300",
                "\"maxTimeoutSeconds\":18446744073709551616",
            ),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.value negative",
            v2(|d| d["payload"]["authorization"]["value"] = json!("-1000")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.value hex",
            v2(|d| d["payload"]["authorization"]["value"] = json!("0x3e8")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.value as a JSON number",
            v2(|d| d["payload"]["authorization"]["value"] = json!(1000)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.value with a leading zero",
            v2(|d| d["payload"]["authorization"]["value"] = json!("01000")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.value 2^256",
            v2(|d| d["payload"]["authorization"]["value"] = json!(TWO_POW_256)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.validBefore of 4000 digits",
            v2(|d| d["payload"]["authorization"]["validBefore"] = json!("9".repeat(4000))),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.validAfter \"00\"",
            v2(|d| d["payload"]["authorization"]["validAfter"] = json!("00")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- The authorization does not pay what is asked (each re-signed: only that is wrong).
        case(
            "authorization.value below the amount",
            resigned(|a| a.value = U256::from(999)),
            PAYMENT_REQUIRED,
            BAD_VALUE,
        ),
        case(
            "authorization.value above the amount",
            resigned(|a| a.value = U256::from(1001)),
            PAYMENT_REQUIRED,
            BAD_VALUE,
        ),
        case(
            "authorization.value zero",
            resigned(|a| a.value = U256::ZERO),
            PAYMENT_REQUIRED,
            BAD_VALUE,
        ),
        case(
            "authorization.to is not payTo",
            resigned(|a| a.to = OTHER),
            PAYMENT_REQUIRED,
            BAD_RECIPIENT,
        ),
        case(
            "expired: validBefore < now + 6",
            resigned(|a| a.valid_before = U256::from(NOW + 5)),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        case(
            "expired: validBefore in the past",
            resigned(|a| a.valid_before = U256::from(NOW - 1)),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        case(
            "not yet valid: validAfter = now + 1",
            resigned(|a| a.valid_after = U256::from(NOW + 1)),
            PAYMENT_REQUIRED,
            BAD_VALID_AFTER,
        ),
        case(
            "valid longer than maxTimeoutSeconds + 60 s skew",
            resigned(|a| a.valid_before = U256::from(NOW + 300 + 60 + 1)),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        case(
            "validBefore = 2^256 - 1",
            resigned(|a| a.valid_before = U256::MAX),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        // -- Signatures.
        case(
            "signature: one flipped bit in r",
            sig(|s| s[10] ^= 0x01),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: one flipped bit in s",
            sig(|s| s[40] ^= 0x80),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: high s (n - s, flipped v)",
            sig(|s| high_s(s)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: v flipped 27 <-> 28",
            sig(|s| s[64] = if s[64] == 27 { 28 } else { 27 }),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: v = 0",
            sig(|s| s[64] = 0),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: v = 1",
            sig(|s| s[64] = 1),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: v = 29",
            sig(|s| s[64] = 29),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: r = 0",
            sig(|s| s[..32].fill(0)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: s = 0",
            sig(|s| s[32..64].fill(0)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: r = n (out of range)",
            sig(|s| s[..32].copy_from_slice(&N.to_be_bytes::<32>())),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: all zero",
            sig(|s| s.fill(0)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: 64 bytes",
            sig(|s| s.truncate(64)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: 66 bytes",
            sig(|s| s.push(0)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: empty",
            sig(Vec::clear),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: 200-byte smart-wallet blob",
            sig(|s| s.resize(200, 0x64)),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signature: not hex",
            v2(|d| d["payload"]["signature"] = json!("0xzz")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "signer is not from (another key)",
            in_v2(encode(&resigned_with(&other_key(), &req(), &req(), |_| ()))),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "from is someone else (payer signed)",
            resigned(|a| a.from = OTHER),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "from is the zero address (payer signed)",
            resigned(|a| a.from = Address::ZERO),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "from is the zero address, r = s = 0, v = 27",
            v2(|d| {
                d["payload"]["authorization"]["from"] = json!(Address::ZERO);
                d["payload"]["signature"] = json!(Bytes::from([&[0u8; 64][..], &[27]].concat()));
            }),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signed under another EIP-712 name (USD Coin)",
            in_v2(encode(&resigned_with(
                &payer(),
                &req_with(|r| r.extra.as_mut().unwrap()["name"] = json!("USD Coin")),
                &req(),
                |_| (),
            ))),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signed for another chain (8453)",
            in_v2(encode(&resigned_with(
                &payer(),
                &req_with(|r| r.network = tower_x402::Network::BASE),
                &req(),
                |_| (),
            ))),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "signed for another token contract",
            in_v2(encode(&resigned_with(
                &payer(),
                &req_with(|r| r.asset = OTHER.into()),
                &req(),
                |_| (),
            ))),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        // -- Payload shape.
        case(
            "payload missing",
            v2(|d| _ = d.as_object_mut().unwrap().remove("payload")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "payload is a string",
            v2(|d| d["payload"] = json!("0xdeadbeef")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "payload is null",
            v2(|d| d["payload"] = Value::Null),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization missing",
            v2(|d| {
                _ = d["payload"]
                    .as_object_mut()
                    .unwrap()
                    .remove("authorization")
            }),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.nonce too short",
            v2(|d| d["payload"]["authorization"]["nonce"] = json!("0x1234")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.nonce 33 bytes",
            v2(|d| {
                d["payload"]["authorization"]["nonce"] = json!(format!("0x{}", "ab".repeat(33)))
            }),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "authorization.from not an address",
            v2(|d| d["payload"]["authorization"]["from"] = json!("0x1234")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "unknown field inside authorization",
            v2(|d| d["payload"]["authorization"]["extra"] = json!("x")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "unknown field inside payload",
            v2(|d| d["payload"]["note"] = json!("x")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "Permit2-shaped payload (permit2Authorization)",
            v2(|d| {
                let auth = d["payload"]
                    .as_object_mut()
                    .unwrap()
                    .remove("authorization")
                    .unwrap();
                d["payload"]["permit2Authorization"] = json!({
                    "from": auth["from"],
                    "permitted": { "token": USDC, "amount": AMOUNT },
                    "spender": OTHER,
                    "nonce": "1",
                    "deadline": (NOW + 300).to_string(),
                    "witness": { "to": PAY_TO, "validAfter": (NOW - 600).to_string(), "extra": "0x" },
                });
            }),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- JSON text.
        case(
            "duplicate key: two payloads",
            duplicate_top_level("payload", &serde_json::from_str(&valid_payload).unwrap()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "duplicate key: two accepted",
            duplicate_top_level("accepted", &serde_json::from_str(&valid_accepted).unwrap()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "duplicate key: second payload key written with an escape",
            edit_text("\"payload\":", "\"p\\u0061yload\":{},\"payload\":"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "duplicate key: two x402Version",
            duplicate_top_level("x402Version", &json!(2)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "duplicate key inside authorization (value)",
            edit_text("\"authorization\":{", "\"authorization\":{\"value\":\"1\","),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "deep nesting: 2000 [ in payload",
            b64(format!(
                "{{\"x402Version\":2,\"accepted\":{valid_accepted},\"payload\":{}{}}}",
                "[".repeat(2000),
                "]".repeat(2000)
            )
            .as_bytes()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "deep nesting: 2000 [ in accepted.extra",
            edit(
                v2(|d| d["accepted"]["extra"]["deep"] = json!("DEEP")),
                "\"DEEP\"",
                &format!("{}{}", "[".repeat(2000), "]".repeat(2000)),
            ),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "deep nesting: 6000 unclosed [",
            b64("[".repeat(6000).as_bytes()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "deep nesting: 10000 [ (over the size limit)",
            b64("[".repeat(10_000).as_bytes()),
            TOO_LARGE,
            INVALID_PAYLOAD,
        ),
        case(
            "not JSON",
            b64(b"hello, world"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "JSON array",
            b64(format!("[{}]", text_v2()).as_bytes()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case("JSON null", b64(b"null"), BAD_REQUEST, INVALID_PAYLOAD),
        case(
            "JSON string",
            b64(b"\"x402\""),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "JSON with trailing garbage",
            b64(format!("{}x", text_v2()).as_bytes()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "JSON with a byte-order mark",
            b64(format!("\u{feff}{}", text_v2()).as_bytes()),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "JSON with invalid UTF-8 in a string",
            invalid_utf8_json(),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- Protocol version.
        case(
            "x402Version 1 in PAYMENT-SIGNATURE",
            v2(|d| d["x402Version"] = json!(1)),
            PAYMENT_REQUIRED,
            INVALID_VERSION,
        ),
        case(
            "x402Version 3",
            v2(|d| d["x402Version"] = json!(3)),
            PAYMENT_REQUIRED,
            INVALID_VERSION,
        ),
        case(
            "x402Version 0",
            v2(|d| d["x402Version"] = json!(0)),
            PAYMENT_REQUIRED,
            INVALID_VERSION,
        ),
        case(
            "x402Version 2 in X-PAYMENT (v2 document)",
            in_v1(encode(&doc_v2())),
            PAYMENT_REQUIRED,
            INVALID_VERSION,
        ),
        case(
            "x402Version 2 in X-PAYMENT (v1 document)",
            v1(|d| d["x402Version"] = json!(2)),
            PAYMENT_REQUIRED,
            INVALID_VERSION,
        ),
        case(
            "x402Version as a string \"2\"",
            v2(|d| d["x402Version"] = json!("2")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "x402Version 2.0",
            edit_text("\"x402Version\":2", "\"x402Version\":2.0"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "x402Version -2",
            v2(|d| d["x402Version"] = json!(-2)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "x402Version 1e400",
            edit_text("\"x402Version\":2", "\"x402Version\":1e400"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "x402Version 99999999999999999999999",
            edit_text(
                "\"x402Version\":2",
                "\"x402Version\":99999999999999999999999",
            ),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "x402Version missing",
            v2(|d| _ = d.as_object_mut().unwrap().remove("x402Version")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- Base64 and header bytes.
        case(
            "not base64",
            raw(b"%%% not base64 %%%"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case("URL-safe base64", url_safe(), BAD_REQUEST, INVALID_PAYLOAD),
        case(
            "base64 without padding",
            unpadded(),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "base64 with a space inside",
            base64_with(" "),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "base64 with a tab inside",
            base64_with("\t"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "base64 with excess padding",
            {
                let (n, v) = in_v2(encode(&doc_v2())).remove(0);
                vec![(
                    n,
                    HeaderValue::try_from(format!("{}=", v.to_str().unwrap())).unwrap(),
                )]
            },
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case("empty header value", raw(b""), BAD_REQUEST, INVALID_PAYLOAD),
        case(
            "invalid UTF-8 bytes in the header value",
            raw(b"eyJ4NDAyVmVyc2lvbiI6Mn0\xff\xfe"),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "oversized: 8193 bytes",
            raw(&[b'A'; 8193]),
            TOO_LARGE,
            INVALID_PAYLOAD,
        ),
        case(
            "oversized: a valid proof padded past 8 KiB",
            padded_over_limit(),
            TOO_LARGE,
            INVALID_PAYLOAD,
        ),
        case(
            "oversized X-PAYMENT",
            in_v1(HeaderValue::from_bytes(&[b'A'; 9000]).unwrap()),
            TOO_LARGE,
            INVALID_PAYLOAD,
        ),
        // -- Header multiplicity.
        case(
            "PAYMENT-SIGNATURE twice",
            [in_v2(encode(&doc_v2())), in_v2(encode(&doc_v2()))].concat(),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "X-PAYMENT twice",
            [in_v1(encode(&doc_v1())), in_v1(encode(&doc_v1()))].concat(),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "PAYMENT-SIGNATURE and X-PAYMENT",
            [in_v2(encode(&doc_v2())), in_v1(encode(&doc_v1()))].concat(),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        // -- v1 specifics.
        case(
            "v1: unknown network name",
            v1(|d| d["network"] = json!("base-goerli")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "v1: CAIP-2 network",
            v1(|d| d["network"] = json!("eip155:84532")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "v1: network base, route on base-sepolia",
            v1(|d| d["network"] = json!("base")),
            PAYMENT_REQUIRED,
            INVALID_NETWORK,
        ),
        case(
            "v1: network avalanche-fuji",
            v1(|d| d["network"] = json!("avalanche-fuji")),
            PAYMENT_REQUIRED,
            INVALID_NETWORK,
        ),
        case(
            "v1: network missing",
            v1(|d| _ = d.as_object_mut().unwrap().remove("network")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "v1: unknown scheme",
            v1(|d| d["scheme"] = json!("upto")),
            PAYMENT_REQUIRED,
            UNSUPPORTED_SCHEME,
        ),
        case(
            "v1: value above the amount",
            resigned_v1(|a| a.value = U256::from(1001)),
            PAYMENT_REQUIRED,
            BAD_VALUE,
        ),
        case(
            "v1: to is not payTo",
            resigned_v1(|a| a.to = OTHER),
            PAYMENT_REQUIRED,
            BAD_RECIPIENT,
        ),
        case(
            "v1: expired",
            resigned_v1(|a| a.valid_before = U256::from(NOW)),
            PAYMENT_REQUIRED,
            BAD_VALID_BEFORE,
        ),
        case(
            "v1: high s",
            v1(|d| {
                let mut s = hex_bytes(&d["payload"]["signature"]);
                high_s(&mut s);
                d["payload"]["signature"] = json!(Bytes::from(s));
            }),
            PAYMENT_REQUIRED,
            BAD_SIGNATURE,
        ),
        case(
            "v1: payload missing",
            v1(|d| _ = d.as_object_mut().unwrap().remove("payload")),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
        case(
            "v1: unknown field inside authorization",
            v1(|d| d["payload"]["authorization"]["permit"] = json!(true)),
            BAD_REQUEST,
            INVALID_PAYLOAD,
        ),
    ]
}

fn hex_bytes(v: &Value) -> Vec<u8> {
    serde_json::from_value::<Bytes>(v.clone()).unwrap().to_vec()
}

/// Text surgery on an already encoded header: decode, replace, re-encode.
fn edit(mut headers: Headers, from: &str, to: &str) -> Headers {
    let (name, value) = headers.remove(0);
    let text = String::from_utf8(STANDARD.decode(value.as_bytes()).unwrap()).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    let edited = text.replacen(from, to, 1);
    vec![(
        name,
        HeaderValue::try_from(STANDARD.encode(edited)).unwrap(),
    )]
}

/// A valid v2 document whose `"exact"` gets a 0xff byte: JSON text that is not UTF-8.
fn invalid_utf8_json() -> Headers {
    let text = text_v2();
    let at = text.find("\"exact\"").unwrap() + 3;
    let mut bytes = text.into_bytes();
    bytes.insert(at, 0xff);
    b64(&bytes)
}

#[tokio::test]
async fn every_bad_input_is_refused_with_its_status_and_reason() {
    let clock = clock();
    let hits = Hits::new();
    let svc = layer(&clock).layer(app(&hits));
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    eprintln!("{} bad-input cases", cases.len());

    let mut failures = Vec::new();
    for &Case {
        name,
        ref headers,
        status,
        reason,
    } in &cases
    {
        let r = get_with(&svc, "/paid", headers.clone()).await;
        let got = (r.status, r.reason());
        if got != (status, Some(reason.to_owned())) {
            failures.push(format!(
                "{name}: want ({status}, {reason}), got ({}, {:?})",
                got.0, got.1
            ));
            continue;
        }
        // Whatever the refusal, it is the layer's, uncacheable, receipt-free and consistent.
        let problems = [
            (
                r.header("cache-control") != Some("no-store"),
                "no Cache-Control: no-store",
            ),
            (!r.has_no_receipt(), "a receipt on a refusal"),
            (
                r.rejection
                    .as_ref()
                    .map(|x| (x.status, x.reason.as_ref().map(|r| r.as_str())))
                    != Some((status, Some(reason))),
                "PaymentRejection extension disagrees",
            ),
            (
                status == PAYMENT_REQUIRED && r.json()["error"] != json!(reason),
                "v1 body error differs from the v2 header's",
            ),
            (
                status != PAYMENT_REQUIRED && r.headers.contains_key("payment-required"),
                "a challenge on a non-402",
            ),
        ];
        for (bad, what) in problems {
            if bad {
                failures.push(format!("{name}: {what}"));
            }
        }
    }
    assert_eq!(hits.get(), 0, "a bad input reached the handler");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // The control: the untampered payment the cases start from is accepted.
    let r = get_with(&svc, "/paid", in_v2(encode(&doc_v2()))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    let r = get_with(&svc, "/paid", in_v1(encode(&doc_v1()))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.reason());
    assert_eq!(hits.get(), 2);
}
