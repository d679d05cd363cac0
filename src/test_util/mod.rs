//! Signing helpers for tests, demos and benchmarks: build the payment a client would send.
//!
//! These use a local private key. A real client signs with any alloy `Signer` the same way:
//! the digest is [`signing_hash`].
//!
//! [`faults`] wraps stores, ledgers and bodies so that tests can make them fail on command.

pub mod faults;

use alloy_primitives::{Address, B256, Bytes, U256};
use alloy_signer::SignerSync;
pub use alloy_signer_local::PrivateKeySigner;
use http::{HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::proto::X402Version;
use crate::proto::exact::{Authorization, ExactEvmPayload};
use crate::proto::header::{self, PAYMENT_SIGNATURE, X_PAYMENT};
use crate::proto::upto::{Permit2Authorization, TokenPermissions, UptoEvmPayload, UptoWitness};
use crate::proto::v2::{PaymentRequirements, ResourceInfo};
use crate::verify::exact::{domain_separator, signing_hash};

/// Anvil's well-known account #1 key: public test funds only, never real money.
pub const DEMO_PAYER_KEY: &str =
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

/// A signer for [`DEMO_PAYER_KEY`].
pub fn demo_payer() -> PrivateKeySigner {
    DEMO_PAYER_KEY
        .parse()
        .expect("the demo key is a valid constant")
}

/// A fresh random 32-byte nonce.
pub fn random_nonce() -> B256 {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("OS randomness");
    B256::from(b)
}

/// The authorization an official client would sign for `req` at `now`: exact amount to
/// `payTo`, `validAfter = now - 600`, `validBefore = now + maxTimeoutSeconds`, random nonce.
pub fn authorization(req: &PaymentRequirements, from: Address, now: u64) -> Authorization {
    Authorization {
        from,
        to: req.pay_to.evm().unwrap_or_default(),
        value: req.amount,
        valid_after: U256::from(now.saturating_sub(600)),
        valid_before: U256::from(now + req.max_timeout_seconds),
        nonce: random_nonce(),
    }
}

/// Signs `auth` under `req`'s EIP-712 domain: 65 bytes `r ‖ s ‖ v`, `v ∈ {27, 28}`, low `s`.
pub fn sign(signer: &impl SignerSync, req: &PaymentRequirements, auth: &Authorization) -> Bytes {
    let sep = domain_separator(
        req.extra_str("name").unwrap_or_default(),
        req.extra_str("version").unwrap_or_default(),
        req.network.chain_id(),
        req.asset.evm().unwrap_or_default(),
    );
    let sig = signer
        .sign_hash_sync(&signing_hash(sep, auth))
        .expect("local signing does not fail");
    Bytes::copy_from_slice(&sig.as_bytes())
}

/// A signed exact payload for `req`, valid at `now`.
pub fn exact_payload(
    signer: &PrivateKeySigner,
    req: &PaymentRequirements,
    now: u64,
) -> ExactEvmPayload {
    let authorization = authorization(req, signer.address(), now);
    let signature = sign(signer, req, &authorization);
    ExactEvmPayload {
        signature,
        authorization,
    }
}

/// The v2 `PAYMENT-SIGNATURE` JSON for `payload` paying `req` (as a `Value`, to tamper with).
pub fn v2_json(
    req: &PaymentRequirements,
    payload: &ExactEvmPayload,
    resource: Option<&ResourceInfo>,
) -> Value {
    let mut v = json!({ "x402Version": 2, "accepted": req, "payload": payload });
    if let Some(r) = resource {
        v["resource"] = json!(r);
    }
    v
}

/// The v1 `X-PAYMENT` JSON for `payload` paying `req`.
pub fn v1_json(req: &PaymentRequirements, payload: &ExactEvmPayload) -> Value {
    json!({
        "x402Version": 1,
        "scheme": req.scheme,
        "network": X402Version::V1.network_name(req.network),
        "payload": payload,
    })
}

/// Encodes a JSON document as a header value (base64 of compact JSON).
pub fn encode(json: &Value) -> HeaderValue {
    header::encode(json)
}

/// A complete payment header for `req`: name and value, as the official clients send them.
pub fn pay(
    signer: &PrivateKeySigner,
    req: &PaymentRequirements,
    now: u64,
    version: X402Version,
) -> (HeaderName, HeaderValue) {
    let payload = exact_payload(signer, req, now);
    match version {
        X402Version::V2 => (PAYMENT_SIGNATURE, encode(&v2_json(req, &payload, None))),
        X402Version::V1 => (X_PAYMENT, encode(&v1_json(req, &payload))),
    }
}

/// The Permit2 permit the official `UptoEvmScheme` client signs for `req` at `now`: the
/// maximum `req.amount` of `req.asset`, spender = the upto proxy, `witness.to = payTo`,
/// `witness.facilitator = extra.facilitatorAddress`, `validAfter = 0`,
/// `deadline = now + maxTimeoutSeconds`, a random 256-bit nonce.
pub fn upto_permit(req: &PaymentRequirements, from: Address, now: u64) -> Permit2Authorization {
    let facilitator = req
        .extra_str(crate::verify::upto::FACILITATOR_ADDRESS)
        .and_then(|a| a.parse().ok())
        .unwrap_or_default();
    Permit2Authorization {
        from,
        permitted: TokenPermissions {
            token: req.asset.evm().unwrap_or_default(),
            amount: req.amount,
        },
        spender: crate::verify::upto::UPTO_PROXY,
        nonce: U256::from_be_bytes(random_nonce().0),
        deadline: U256::from(now + req.max_timeout_seconds),
        witness: UptoWitness {
            to: req.pay_to.evm().unwrap_or_default(),
            facilitator,
            valid_after: U256::ZERO,
        },
    }
}

/// Signs `permit` under Permit2's EIP-712 domain on `req`'s chain.
pub fn sign_upto(
    signer: &impl SignerSync,
    req: &PaymentRequirements,
    permit: &Permit2Authorization,
) -> Bytes {
    let digest = crate::verify::upto::signing_hash(req.network.chain_id(), permit);
    let sig = signer
        .sign_hash_sync(&digest)
        .expect("local signing does not fail");
    Bytes::copy_from_slice(&sig.as_bytes())
}

/// A signed `upto` payload for `req`, valid at `now`.
pub fn upto_payload(
    signer: &PrivateKeySigner,
    req: &PaymentRequirements,
    now: u64,
) -> UptoEvmPayload {
    let permit2_authorization = upto_permit(req, signer.address(), now);
    let signature = sign_upto(signer, req, &permit2_authorization);
    UptoEvmPayload {
        signature,
        permit2_authorization,
    }
}

/// A complete v2 `PAYMENT-SIGNATURE` header paying `req` (an `upto` requirement) with
/// `payload`.
pub fn pay_upto(req: &PaymentRequirements, payload: &UptoEvmPayload) -> (HeaderName, HeaderValue) {
    let json = json!({ "x402Version": 2, "accepted": req, "payload": payload });
    (PAYMENT_SIGNATURE, encode(&json))
}

/// A `SIGN-IN-WITH-X` header answering `declaration` (the `sign-in-with-x` extension of a
/// 402) for `signer`, on the first chain it offers: what `@x402/extensions`' SIWX client
/// sends (an EIP-4361 message signed with EIP-191 `personal_sign`).
///
/// # Panics
/// When `declaration` is not a sign-in declaration of this crate's shape (test input).
pub fn sign_in_with_x(signer: &PrivateKeySigner, declaration: &Value) -> (HeaderName, HeaderValue) {
    use base64::Engine as _;
    let chain = &declaration["supportedChains"][0];
    let mut p = declaration["info"].clone();
    p["address"] = json!(signer.address().to_checksum(None));
    p["chainId"] = chain["chainId"].clone();
    p["type"] = chain["type"].clone();
    p["signature"] = json!("0x");
    let chain_id = chain["chainId"]
        .as_str()
        .and_then(|c| c.strip_prefix("eip155:"))
        .and_then(|c| c.parse().ok())
        .expect("an eip155 chain");
    let fields: crate::prepaid::siwx::Payload =
        serde_json::from_value(p.clone()).expect("a sign-in declaration");
    let text = crate::prepaid::siwx::message(&fields, signer.address(), chain_id);
    let sig = signer
        .sign_message_sync(text.as_bytes())
        .expect("local signing does not fail");
    p["signature"] = json!(Bytes::copy_from_slice(&sig.as_bytes()));
    let value = base64::engine::general_purpose::STANDARD.encode(p.to_string());
    (
        crate::prepaid::siwx::SIGN_IN_WITH_X,
        HeaderValue::try_from(value).expect("base64 is a header value"),
    )
}
