//! Responses the layer writes itself: the 402 challenge, refusals, and receipt headers.
use std::time::Duration;

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, Uri};
use serde::Serialize;

use crate::body::ResponseBody;
use crate::layer::{PaymentOption, Shared};
use crate::proto::header::{self, PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use crate::proto::{SettleResponse, X402Version, v1, v2};
use crate::rejection::Rejection;

const EXPOSE: HeaderValue =
    HeaderValue::from_static("PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// What `resource.url` is built from: cheap refcounted copies taken from the request, so the
/// URL string is only formatted when a challenge is actually sent.
pub(crate) struct Resource {
    uri: Uri,
    host: Option<HeaderValue>,
}

impl Resource {
    pub(crate) fn of(parts: &Parts) -> Self {
        Self {
            uri: parts.uri.clone(),
            host: parts.headers.get(HOST).cloned(),
        }
    }

    /// The request URI.
    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// `resource.url` for this request.
    fn url(&self, shared: &Shared) -> String {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(base) = &shared.resource_base {
            return format!("{base}{path}");
        }
        if let (Some(scheme), Some(auth)) = (self.uri.scheme_str(), self.uri.authority()) {
            return format!("{scheme}://{auth}{path}");
        }
        match self.host.as_ref().and_then(|h| h.to_str().ok()) {
            Some(host) => format!("http://{host}{path}"),
            None => path.to_owned(),
        }
    }
}

/// The two challenge documents: v2 (for the header) and v1 (the JSON body).
pub(crate) fn challenge(
    shared: &Shared,
    options: &[PaymentOption],
    resource: &str,
    reason: Option<&'static str>,
) -> (v2::PaymentRequired, v1::PaymentRequired) {
    let v2 = v2::PaymentRequired {
        x402_version: 2,
        error: reason.map(str::to_owned),
        resource: v2::ResourceInfo {
            url: resource.to_owned(),
            description: shared.description.clone(),
            mime_type: shared.mime_type.clone(),
        },
        accepts: options.iter().map(|o| o.requirements().clone()).collect(),
        extensions: shared.extensions.clone(),
    };
    let v1 = v1::PaymentRequired {
        x402_version: 1,
        error: reason.map(str::to_owned),
        accepts: options
            .iter()
            .filter(|o| o.requirements().network.v1_name().is_some())
            .map(|o| {
                let r = o.requirements();
                v1::PaymentRequirements {
                    scheme: r.scheme.clone(),
                    network: r.network,
                    max_amount_required: r.amount,
                    resource: resource.to_owned(),
                    description: shared.description.clone().unwrap_or_default(),
                    mime_type: shared.mime_type.clone(),
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
            let (v2, v1) = challenge(shared, options, &resource.url(shared), *reason);
            // Only the forms the route accepts: a client offered a v2 header by a v1-only
            // route would pay in v2 and be refused.
            let body = if shared.accept_v1 {
                serde_json::to_vec(&v1)
            } else {
                serde_json::to_vec(&v2)
            };
            let mut res = Response::new(ResponseBody::full(body.unwrap_or_default()));
            if shared.accept_v2 {
                res.headers_mut()
                    .insert(PAYMENT_REQUIRED, header::encode(&v2));
            }
            res
        }
        Rejection::BadRequest { reason, message } => json_error(reason, Some(message)),
        Rejection::TooLarge { message } => {
            json_error(crate::rejection::reason::INVALID_PAYLOAD, Some(message))
        }
        Rejection::Unavailable {
            retry_after,
            reason,
        } => {
            let message = (*reason == crate::rejection::reason::SETTLEMENT_OUTCOME_UNKNOWN)
                .then_some(UNKNOWN_OUTCOME);
            let mut res = json_error(reason, message);
            set_retry_after(res.headers_mut(), *retry_after);
            res
        }
        Rejection::Conflict { reason } => json_error(reason, None),
        Rejection::RateLimited { retry_after } => {
            let mut res = json_error(crate::rejection::reason::RATE_LIMITED, None);
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
    headers.insert(name, header::encode_json(&receipt.to_json(version)));
}
