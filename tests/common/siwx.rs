//! Sign-in-with-x on the client side, in-process: read a 402's declaration, write and sign the
//! EIP-4361 message as the official client does, buy a bundle, and a handler that reports the
//! [`SignedIn`] it saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use alloy_signer::SignerSync;
use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tower_x402::VerifiedPayment;
use tower_x402::prepaid::SignedIn;
use tower_x402::primitives::Address;
use tower_x402::proto::X402Version;
use tower_x402::test_util::{PrivateKeySigner, pay};

use super::{Reply, STATUS_HEADER, get_with, payer};

/// The sign-in header.
pub const SIWX: HeaderName = HeaderName::from_static("sign-in-with-x");

/// Handler runs, and what each saw.
#[derive(Clone, Default)]
pub struct Runs(pub Arc<AtomicUsize>);

impl Runs {
    /// Handler bodies run so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts, answers the status asked in [`STATUS_HEADER`] and says how it was let in:
    /// `{"paid", "signedIn", "remaining"}`.
    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<Body>,
        Response = Response<Full<Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    >
    + Clone
    + Send
    + 'static
    + use<> {
        let runs = self.0.clone();
        tower::service_fn(move |req: Request<Body>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let signed = req.extensions().get::<SignedIn>().copied();
                let paid = req.extensions().get::<VerifiedPayment>().is_some();
                let body = json!({
                    "paid": paid,
                    "signedIn": signed.map(|s| s.payer.to_checksum(None)),
                    "remaining": signed.and_then(|s| s.remaining),
                });
                let status = req
                    .headers()
                    .get(STATUS_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK);
                let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
                *res.status_mut() = status;
                Ok(res)
            }
        })
    }
}

/// The `sign-in-with-x` declaration of a 402.
pub fn declaration(reply: &Reply) -> Value {
    let challenge = reply.challenge();
    let ext = challenge.extensions.expect("the challenge has extensions");
    ext.get("sign-in-with-x")
        .expect("the challenge declares sign-in-with-x")
        .clone()
}

/// EIP-4361 text, written from the spec (not from the crate) so the two are checked against
/// each other.
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
    let hex: String = signature.iter().map(|x| format!("{x:02x}")).collect();
    p["signature"] = json!(format!("0x{hex}"));
    p
}

/// The payload the official client would send for `decl`, signed by `signer` on behalf of
/// `claimed`, after `tweak` edits it (before signing).
pub fn payload(
    signer: &PrivateKeySigner,
    claimed: Address,
    decl: &Value,
    tweak: impl FnOnce(&mut Value),
) -> Value {
    let mut p = unsigned(claimed, decl);
    tweak(&mut p);
    let sig = personal_sign(signer, &p);
    signed(p, &sig)
}

/// The `SIGN-IN-WITH-X` header carrying `p`.
pub fn header(p: &Value) -> (HeaderName, HeaderValue) {
    let v = STANDARD.encode(p.to_string());
    (
        SIWX,
        HeaderValue::try_from(v).expect("base64 is a header value"),
    )
}

/// A fresh 402 for `/paid` from `svc`, signed in by `signer` as itself.
pub async fn signed_header<S, B>(svc: &S, signer: &PrivateKeySigner) -> (HeaderName, HeaderValue)
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let challenge = get_with(svc, "/paid", []).await;
    assert_eq!(challenge.status, StatusCode::PAYMENT_REQUIRED);
    header(&payload(
        signer,
        signer.address(),
        &declaration(&challenge),
        |_| {},
    ))
}

/// Pays the bundle price of `svc`'s challenge at `now` as [`payer`]; asserts the paid call
/// was served.
pub async fn buy<S, B>(svc: &S, now: u64) -> Reply
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let challenge = get_with(svc, "/paid", []).await.challenge();
    let proof = pay(&payer(), &challenge.accepts[0], now, X402Version::V2);
    let paid = get_with(svc, "/paid", [proof]).await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.receipt()["success"], json!(true));
    assert_eq!(paid.json()["paid"], json!(true));
    paid
}
