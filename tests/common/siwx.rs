//! Sign-in-with-x helpers for the integration tests: the EIP-4361 text written from the spec
//! (not from the crate, so the two are checked against each other) and the `SIGN-IN-WITH-X`
//! header the official client would send. Include with
//! `#[path = "common/siwx.rs"] mod siwx;` next to `mod common;`.
#![allow(dead_code)]

use alloy_signer::SignerSync;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use tower_x402::primitives::Address;
use tower_x402::test_util::PrivateKeySigner;

use super::common::Reply;

/// The request header of a sign-in.
pub const SIWX: HeaderName = HeaderName::from_static("sign-in-with-x");

/// The `sign-in-with-x` declaration of a 402.
pub fn declaration(reply: &Reply) -> Value {
    let challenge = reply.challenge();
    let ext = challenge.extensions.expect("the challenge has extensions");
    ext.get("sign-in-with-x")
        .expect("the challenge declares sign-in-with-x")
        .clone()
}

/// EIP-4361 text of a payload (without its signature).
pub fn siwe_message(p: &Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
    let chain = s("chainId").trim_start_matches("eip155:").to_owned();
    let mut m = format!(
        "{} wants you to sign in with your Ethereum account:\n{}\n\n",
        s("domain"),
        s("address")
    );
    if let Some(st) = p["statement"].as_str() {
        m += &format!("{st}\n\n");
    } else {
        m += "\n";
    }
    m += &format!(
        "URI: {}\nVersion: {}\nChain ID: {chain}\nNonce: {}\nIssued At: {}",
        s("uri"),
        s("version"),
        s("nonce"),
        s("issuedAt")
    );
    if let Some(t) = p["expirationTime"].as_str() {
        m += &format!("\nExpiration Time: {t}");
    }
    if let Some(rs) = p["resources"].as_array() {
        m += "\nResources:";
        for r in rs {
            m += &format!("\n- {}", r.as_str().unwrap_or_default());
        }
    }
    m
}

/// The unsigned payload for `decl`'s first chain, claiming `claimed`.
pub fn unsigned(claimed: Address, decl: &Value) -> Value {
    let chain = &decl["supportedChains"][0];
    let mut p = decl["info"].clone();
    p["address"] = json!(claimed.to_checksum(None));
    p["chainId"] = chain["chainId"].clone();
    p["type"] = chain["type"].clone();
    p
}

/// `key`'s EIP-191 `personal_sign` signature of `p`'s message (65 bytes, `v` 27/28).
pub fn personal_sign(key: &PrivateKeySigner, p: &Value) -> Vec<u8> {
    key.sign_message_sync(siwe_message(p).as_bytes())
        .expect("signs")
        .as_bytes()
        .to_vec()
}

/// `p` with `signature` as `0x` hex.
pub fn signed(mut p: Value, signature: &[u8]) -> Value {
    p["signature"] = json!(format!("0x{}", hex(signature)));
    p
}

/// Lowercase hex without `0x`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `SIGN-IN-WITH-X` header carrying `p`.
pub fn header(p: &Value) -> (HeaderName, HeaderValue) {
    let v = STANDARD.encode(p.to_string());
    (
        SIWX,
        HeaderValue::try_from(v).expect("base64 is a header value"),
    )
}
