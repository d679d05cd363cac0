//! Responses the layer writes itself: the 402 challenge, refusals, and receipt headers.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use serde::Serialize;

use crate::body::ResponseBody;
use crate::challenge::{Binding, EXTRA_FIELD};
use crate::config::Shared;
use crate::kept::Kept;
use crate::option::PaymentOption;
use crate::proto::header::{self, PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use crate::proto::v2::PaymentRequirements;
use crate::proto::{SettleResponse, X402Version, v1, v2};
use crate::rejection::{Reason, Rejection};

const EXPOSE: HeaderValue =
    HeaderValue::from_static("PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// What `resource.url` is built from: cheap refcounted copies taken from the request, so the
/// URL string is only formatted when a challenge is actually sent.
pub(crate) struct Resource {
    uri: Uri,
    host: Option<HeaderValue>,
    /// Bound challenges cover the method.
    pub(crate) method: Method,
}

impl Resource {
    pub(crate) fn of(parts: &Parts) -> Self {
        Self {
            uri: parts.uri.clone(),
            host: parts.headers.get(HOST).cloned(),
            method: parts.method.clone(),
        }
    }

    /// The request URI.
    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// `resource.url` for this request.
    pub(crate) fn url(&self, shared: &Shared) -> String {
        self.url_parts(shared).concat()
    }

    /// Whether `url` is [`Self::url`], without building it (a challenge cache lookup).
    fn url_is(&self, shared: &Shared, url: &str) -> bool {
        let mut rest = url;
        for part in self.url_parts(shared) {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }

    /// The pieces `resource.url` is the concatenation of (the one place that decides it).
    fn url_parts<'a>(&'a self, shared: &'a Shared) -> [&'a str; 4] {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(base) = &shared.resource_base {
            return [base, "", "", path];
        }
        if let (Some(scheme), Some(auth)) = (self.uri.scheme_str(), self.uri.authority()) {
            return [scheme, "://", auth.as_str(), path];
        }
        match self.host.as_ref().and_then(|h| h.to_str().ok()) {
            Some(host) => ["http://", host, "", path],
            None => ["", "", "", path],
        }
    }
}

/// The two challenge documents: v2 (for the header) and v1 (the JSON body).
pub(crate) fn challenge(
    shared: &Shared,
    options: &[PaymentOption],
    resource: &str,
    method: &Method,
    reason: Option<&Reason>,
) -> (v2::PaymentRequired, v1::PaymentRequired) {
    let v2 = v2::PaymentRequired {
        x402_version: 2,
        error: reason.map(|r| r.as_str().to_owned()),
        resource: v2::ResourceInfo {
            url: resource.to_owned(),
            description: shared.description.clone(),
            mime_type: shared.mime_type.clone(),
            service_name: shared.service.name.clone(),
            tags: shared.service.tags.clone(),
            icon_url: shared.service.icon_url.clone(),
        },
        accepts: options
            .iter()
            .map(|o| bound(shared, o, resource, method))
            .collect(),
        extensions: match &shared.prepaid {
            // A fresh sign-in nonce per challenge, next to the layer's other extensions.
            Some(p) => Some(p.extensions(shared.extensions.as_ref(), resource, options)),
            None => shared.extensions.clone(),
        },
    };
    let v1 = v1::PaymentRequired {
        x402_version: 1,
        error: reason.map(|r| r.as_str().to_owned()),
        accepts: options
            .iter()
            // `upto` is a v2 scheme: no v1 client speaks it.
            .filter(|o| o.requirements().network.v1_name().is_some() && !o.is_upto())
            .map(|o| {
                let r = o.requirements();
                v1::PaymentRequirements {
                    scheme: r.scheme.clone(),
                    network: r.network,
                    max_amount_required: r.amount,
                    resource: resource.to_owned(),
                    description: shared.description.clone().unwrap_or_default(),
                    // Always present, as the reference sends it (`mimeType ?? ""`): the v1 JS
                    // client's schema refuses a challenge without it.
                    mime_type: Some(shared.mime_type.clone().unwrap_or_default()),
                    output_schema: None,
                    pay_to: r.pay_to,
                    max_timeout_seconds: r.max_timeout_seconds,
                    asset: r.asset,
                    extra: r.extra.clone(),
                }
            })
            .collect(),
    };
    (v2, v1)
}

/// The `PAYMENT-REQUIRED` value and the body. Only the forms the route accepts: a client
/// offered a v2 header by a v1-only route would pay in v2 and be refused.
fn encode(
    shared: &Shared,
    v2: &v2::PaymentRequired,
    v1: &v1::PaymentRequired,
) -> (Option<HeaderValue>, Bytes) {
    let header = shared.accept_v2.then(|| header::encode(v2));
    let body = if shared.accept_v1 {
        serde_json::to_vec(v1)
    } else {
        serde_json::to_vec(v2)
    };
    (header, Bytes::from(body.unwrap_or_default()))
}

/// A challenge as sent (`PAYMENT-REQUIRED` value and v1 body) and everything it was built
/// from, so a hit is exactly what building it again would give.
struct CachedChallenge {
    url: String,
    reason: Option<Reason>,
    requirements: Vec<PaymentRequirements>,
    description: Option<String>,
    mime_type: Option<String>,
    service: crate::config::ServiceMeta,
    /// Which forms were built (v1 body, v2 header).
    versions: (bool, bool),
    extensions: Option<serde_json::Map<String, serde_json::Value>>,
    header: Option<HeaderValue>,
    body: Bytes,
}

/// Challenges kept per thread (a handful of priced routes; more just rebuild).
const CHALLENGE_SLOTS: usize = 8;

thread_local! {
    /// A priced route answers every unpaid request with the same 402. Building it costs about
    /// 50,000 instructions (two JSON documents, four EIP-55 checksums, base64); finding it
    /// here costs a URL and a few comparisons. Slots are reused round-robin.
    static CHALLENGES: RefCell<Kept<CachedChallenge, CHALLENGE_SLOTS>> = const { RefCell::new(Kept::new()) };
}

/// The encoded challenge for `resource` and `reason`: from this thread's cache, or built (and
/// kept). A hit compares the URL piece by piece instead of formatting it (a quarter of the
/// cost of a cached 402 went to `format!`).
fn encoded_challenge(
    shared: &Shared,
    options: &[PaymentOption],
    resource: &Resource,
    reason: Option<&Reason>,
) -> (Option<HeaderValue>, Bytes) {
    let method = &resource.method;
    if shared.challenges.is_some() || shared.prepaid.is_some() {
        // Bound challenges carry a fresh id each, prepaid ones a fresh sign-in nonce:
        // nothing to share between requests.
        let url = resource.url(shared);
        let (mut v2, v1) = challenge(shared, options, &url, method, reason);
        crate::discovery::enrich(&mut v2, resource.uri().path());
        return encode(shared, &v2, &v1);
    }
    let versions = (shared.accept_v1, shared.accept_v2);
    let same = |c: &CachedChallenge| {
        c.reason.as_ref() == reason
            && resource.url_is(shared, &c.url)
            && c.versions == versions
            && c.extensions == shared.extensions
            && c.description == shared.description
            && c.mime_type == shared.mime_type
            && c.service == shared.service
            && c.requirements.len() == options.len()
            && c.requirements
                .iter()
                .zip(options)
                .all(|(r, o)| r == o.requirements())
    };
    CHALLENGES.with_borrow_mut(|kept| {
        if let Some(c) = kept.iter().find(|c| same(c)) {
            return (c.header.clone(), c.body.clone());
        }
        let url = resource.url(shared);
        let (mut v2, v1) = challenge(shared, options, &url, method, reason);
        crate::discovery::enrich(&mut v2, resource.uri().path());
        let (header, body) = encode(shared, &v2, &v1);
        let entry = CachedChallenge {
            url,
            reason: reason.cloned(),
            requirements: options.iter().map(|o| o.requirements().clone()).collect(),
            description: shared.description.clone(),
            mime_type: shared.mime_type.clone(),
            service: shared.service.clone(),
            versions,
            extensions: shared.extensions.clone(),
            header: header.clone(),
            body: body.clone(),
        };
        kept.keep(entry);
        (header, body)
    })
}

/// The v2 requirement of `option`, with a challenge id in `extra` when binding is on. The
/// v1 body gets none: a v1 payload cannot echo it.
fn bound(
    shared: &Shared,
    option: &PaymentOption,
    resource: &str,
    method: &Method,
) -> v2::PaymentRequirements {
    let mut req = option.requirements().clone();
    if let Some(keys) = &shared.challenges {
        let id = keys.issue(&Binding {
            url: resource,
            method: method.as_str(),
            requirements: option.requirements(),
        });
        req.extra
            .get_or_insert_with(Default::default)
            .insert(EXTRA_FIELD.into(), serde_json::Value::String(id));
    }
    req
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// Headers every response that went through payment carries.
pub(crate) fn mark(shared: &Shared, headers: &mut HeaderMap) {
    // A challenge belongs to one request and a paid body to one payer: no shared caching.
    headers.insert(CACHE_CONTROL, NO_STORE);
    if shared.expose_headers {
        headers.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
    }
}

/// The response for a refusal.
pub(crate) fn reject<B>(
    shared: &Shared,
    options: &[PaymentOption],
    resource: &Resource,
    rejection: Rejection,
) -> Response<ResponseBody<B>> {
    let info = rejection.info();
    let mut res = match &rejection {
        Rejection::Pay { reason } => {
            let (header, body) = encoded_challenge(shared, options, resource, reason.as_ref());
            let mut res = Response::new(ResponseBody::full(body));
            if let Some(header) = header {
                res.headers_mut().insert(PAYMENT_REQUIRED, header);
            }
            res
        }
        Rejection::BadRequest { reason, message } => json_error(reason.as_str(), Some(message)),
        Rejection::TooLarge { message } => {
            json_error(crate::reason::INVALID_PAYLOAD.as_str(), Some(message))
        }
        Rejection::Unavailable {
            retry_after,
            reason,
        } => {
            let message =
                (*reason == crate::reason::SETTLEMENT_OUTCOME_UNKNOWN).then_some(UNKNOWN_OUTCOME);
            let mut res = json_error(reason.as_str(), message);
            set_retry_after(res.headers_mut(), *retry_after);
            res
        }
        Rejection::Conflict { reason } => json_error(reason.as_str(), None),
        Rejection::Unauthorized { reason, message } => {
            let mut res = json_error(reason.as_str(), Some(message));
            res.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("SIWX"),
            );
            res
        }
        Rejection::Policy {
            reason, message, ..
        } => json_error(reason.as_str(), Some(message)),
        Rejection::RateLimited { retry_after } => {
            let mut res = json_error(crate::reason::RATE_LIMITED.as_str(), None);
            set_retry_after(res.headers_mut(), *retry_after);
            res
        }
    };
    *res.status_mut() = info.status;
    res.headers_mut().insert(CONTENT_TYPE, JSON);
    mark(shared, res.headers_mut());
    res.extensions_mut().insert(info);
    res
}

/// The 402 `res` as the paywall page: same status and headers (the `PAYMENT-REQUIRED`
/// challenge included), an HTML body.
#[cfg(feature = "paywall")]
pub(crate) fn paywall<B>(
    shared: &Shared,
    page: &crate::paywall::Built,
    options: &[PaymentOption],
    resource: &Resource,
    res: Response<ResponseBody<B>>,
) -> Response<ResponseBody<B>> {
    let (mut parts, _) = res.into_parts();
    let required = parts
        .headers
        .get(PAYMENT_REQUIRED)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let html = page.page(
        options,
        shared.description.as_deref(),
        &resource.url(shared),
        required,
    );
    parts.headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    parts
        .headers
        .insert(http::header::CONTENT_SECURITY_POLICY, page.csp());
    // The page differs from what other clients get for the same URL.
    parts.headers.append(
        http::header::VARY,
        HeaderValue::from_static("Accept, User-Agent"),
    );
    Response::from_parts(parts, ResponseBody::full(Bytes::from(html)))
}

const UNKNOWN_OUTCOME: &str = "the payment may have been settled: do not pay again; \
     retry with the same proof after Retry-After";

fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    // Round up: "Retry-After: 0" would invite a hot retry loop.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
}

fn json_error<B>(reason: &str, message: Option<&str>) -> Response<ResponseBody<B>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: reason,
        message,
    })
    .unwrap_or_default();
    Response::new(ResponseBody::full(body))
}

/// Receipts kept per thread (payers who pay again; more just re-encode).
const RECEIPT_SLOTS: usize = 8;

/// An encoded receipt and what it encodes.
type CachedReceipt = (X402Version, SettleResponse, HeaderValue);

thread_local! {
    /// A receipt without a transaction (verify-only, deferred) is the same for every payment
    /// of one payer and price. Encoding it costs about 10,000 instructions (half of them the
    /// payer's EIP-55 checksum, a Keccak; then JSON and base64); finding it here, a few
    /// comparisons. Slots are reused round-robin.
    static RECEIPTS: RefCell<Kept<CachedReceipt, RECEIPT_SLOTS>> = const { RefCell::new(Kept::new()) };
}

/// Adds the receipt in the header of the client's protocol version.
pub(crate) fn attach_receipt(
    headers: &mut HeaderMap,
    version: X402Version,
    receipt: &SettleResponse,
) {
    let name = match version {
        X402Version::V1 => X_PAYMENT_RESPONSE,
        X402Version::V2 => PAYMENT_RESPONSE,
    };
    headers.insert(name, encoded_receipt(version, receipt));
}

/// The receipt's header value: from this thread's cache when it names no transaction (a
/// transaction hash is new every time, so those are never kept), or encoded.
fn encoded_receipt(version: X402Version, receipt: &SettleResponse) -> HeaderValue {
    let encode = || header::encode_json(&receipt.to_json(version));
    if receipt.transaction.is_some() || receipt.signature.is_some() {
        return encode();
    }
    RECEIPTS.with_borrow_mut(|kept| {
        if let Some((_, _, value)) = kept.iter().find(|(v, r, _)| *v == version && r == receipt) {
            return value.clone();
        }
        let value = encode();
        kept.keep((version, receipt.clone(), value.clone()));
        value
    })
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use alloy_primitives::address;
    use http::{HeaderValue, Request, StatusCode};
    use serde_json::Value;
    use tower_layer::Layer;
    use tower_service::Service;

    use crate::proto::header::{PAYMENT_REQUIRED, PAYMENT_SIGNATURE, decode_bytes};
    use crate::{Network, PaymentLayer};

    fn now_or_never<F: Future>(f: F) -> F::Output {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the challenge path never waits"),
        }
    }

    /// The v2 challenge a layer priced at `price` answers on this thread.
    fn challenge(price: &str, description: &str, payment: Option<&'static str>) -> Value {
        let layer = PaymentLayer::builder()
            .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
            .price(price)
            .network(Network::BASE_SEPOLIA)
            .description(description)
            .build()
            .unwrap();
        let mut svc = layer.layer(tower::service_fn(|_: Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
        let mut req = Request::get("http://api.example/weather")
            .body(String::new())
            .unwrap();
        if let Some(p) = payment {
            req.headers_mut()
                .insert(PAYMENT_SIGNATURE, HeaderValue::from_static(p));
        }
        let res = now_or_never(svc.call(req)).unwrap();
        assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
        let h = res.headers().get(PAYMENT_REQUIRED).unwrap();
        serde_json::from_slice(&decode_bytes(h, 1 << 16).unwrap()).unwrap()
    }

    #[test]
    fn cached_receipts_match_the_payment() {
        use super::{SettleResponse, X402Version, encoded_receipt};
        let receipt = |payer, amount: u64, transaction, success| SettleResponse {
            success,
            error_reason: (!success).then(|| "insufficient_funds".to_owned()),
            payer: Some(alloy_primitives::Address::into(payer)),
            transaction,
            signature: None,
            network: Network::BASE_SEPOLIA,
            amount: Some(alloy_primitives::U256::from(amount)),
        };
        let a = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let b = address!("0x90F79bf6EB2c4f870365E785982E1f101E93b906");
        let tx = Some(alloy_primitives::B256::repeat_byte(7));
        let cases = [
            (X402Version::V2, receipt(a, 1000, None, true)),
            (X402Version::V1, receipt(a, 1000, None, true)),
            (X402Version::V2, receipt(b, 1000, None, true)),
            (X402Version::V2, receipt(a, 2000, None, true)),
            (X402Version::V2, receipt(a, 1000, None, false)),
            (X402Version::V2, receipt(a, 1000, tx, true)),
        ];
        // Twice, and more cases than slots the second time round: hits, misses and evictions
        // must all give exactly what encoding gives.
        for round in 0..2 {
            for i in 0..(if round == 0 { 1 } else { 3 }) {
                for (version, r) in &cases {
                    let mut r = r.clone();
                    if i > 0 {
                        r.amount = Some(alloy_primitives::U256::from(5000 + i));
                    }
                    let fresh = crate::proto::header::encode_json(&r.to_json(*version));
                    assert_eq!(encoded_receipt(*version, &r), fresh, "{version:?} {r:?}");
                }
            }
        }
    }

    /// `resource.url` of the challenge a layer answers `req` with, on this thread.
    fn challenge_url(req: Request<String>) -> Value {
        let layer = PaymentLayer::builder()
            .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
            .price("$0.001")
            .network(Network::BASE_SEPOLIA)
            .build()
            .unwrap();
        let mut svc = layer.layer(tower::service_fn(|_: Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
        let res = now_or_never(svc.call(req)).unwrap();
        let h = res.headers().get(PAYMENT_REQUIRED).unwrap();
        let doc: Value = serde_json::from_slice(&decode_bytes(h, 1 << 16).unwrap()).unwrap();
        doc["resource"]["url"].clone()
    }

    #[test]
    fn cached_challenges_match_the_url() {
        // The cache compares URLs piece by piece: every way a URL is formed, and URLs that
        // share prefixes, must each get their own challenge, hit after hit.
        let get = |uri: &str, host: Option<&str>| {
            let mut r = Request::get(uri);
            if let Some(h) = host {
                r = r.header(http::header::HOST, h);
            }
            r.body(String::new()).unwrap()
        };
        for _ in 0..2 {
            for (uri, host, want) in [
                (
                    "http://api.example/weather",
                    None,
                    "http://api.example/weather",
                ),
                (
                    "http://api.example/weather?x=1",
                    None,
                    "http://api.example/weather?x=1",
                ),
                (
                    "https://api.example/weather",
                    None,
                    "https://api.example/weather",
                ),
                (
                    "http://api.example:8080/weather",
                    None,
                    "http://api.example:8080/weather",
                ),
                (
                    "/weather",
                    Some("api.example"),
                    "http://api.example/weather",
                ),
                ("/weather", Some("api.exampl"), "http://api.exampl/weather"),
                (
                    "/eweather",
                    Some("api.exampl"),
                    "http://api.exampl/eweather",
                ),
                (
                    "/weather/",
                    Some("api.example"),
                    "http://api.example/weather/",
                ),
                ("/weather", None, "/weather"),
            ] {
                assert_eq!(challenge_url(get(uri, host)), want, "{uri} {host:?}");
            }
        }
    }

    #[test]
    fn cached_challenges_match_what_is_sold() {
        // Same thread, same URL: the per-thread cache must still tell these apart.
        for _ in 0..2 {
            let a = challenge("$0.001", "a", None);
            let b = challenge("$0.002", "a", None);
            let c = challenge("$0.001", "c", None);
            assert_eq!(a["accepts"][0]["amount"], "1000");
            assert_eq!(b["accepts"][0]["amount"], "2000");
            assert_eq!(c["resource"]["description"], "c");
            assert_eq!(a["resource"]["url"], "http://api.example/weather");
            assert!(a.get("error").is_none());
            // {"x402Version":1} in the v2 header: refused with a reason, then no reason again.
            let refused = challenge("$0.001", "a", Some("eyJ4NDAyVmVyc2lvbiI6MX0="));
            assert_eq!(refused["error"], "invalid_x402_version");
            assert!(challenge("$0.001", "a", None).get("error").is_none());
        }
    }
}
