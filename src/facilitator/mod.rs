//! Verify and settle through a remote x402 facilitator over HTTP(S).
//!
//! [`FacilitatorClient`] implements both [`Verifier`] and [`Settler`]: give a clone to each.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_x402::facilitator::{BearerToken, FacilitatorClient};
//! use tower_x402::primitives::address;
//! use tower_x402::{Network, PaymentLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let facilitator = FacilitatorClient::builder("https://x402.org/facilitator")
//!     .auth(BearerToken::new("my-api-key")?) // x402.org needs none; hosted ones do
//!     .verify_timeout(Duration::from_secs(5))
//!     .build()?;
//! let layer = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .verifier(facilitator.clone())
//!     .settler(facilitator)
//!     .build()?;
//! # let _ = layer; Ok(()) }
//! ```
//!
//! ## Calls
//!
//! | endpoint | when | body |
//! |---|---|---|
//! | `GET /supported` | first paid request (or [`FacilitatorClient::supported`]), then refreshed in the background every [`supported_refresh`](FacilitatorClientBuilder::supported_refresh) | — |
//! | `POST /verify` | each paid request, before the handler | `{x402Version, paymentPayload, paymentRequirements}` (v1 or v2 dialect) |
//! | `POST /settle` | after the handler answered below 400 | the same bytes `/verify` approved |
//!
//! The requirements sent are always the server's own (never the client's echo). A payment the
//! cached `/supported` says the facilitator cannot take is refused at once (402,
//! `invalid_x402_version` / `unsupported_scheme` / `invalid_network`), and a request never
//! waits for a refresh when a cached copy exists.
//!
//! ## Failures, and what is retried
//!
//! `/verify` has no side effect, so it is retried (transport errors, timeouts, 408, 5xx) up to
//! [`max_attempts`](FacilitatorClientBuilder::max_attempts) with exponential backoff and
//! jitter. `/settle` moves money and the facilitator has no status endpoint, so it is only
//! repeated when the request **surely** did not reach it (connection refused, DNS, TLS);
//! anything that may have reached it is [`SettleError::Unknown`] and never resent:
//!
//! | facilitator | verify | settle |
//! |---|---|---|
//! | `isValid: false` / `success: false` | 402 with its reason ([`wire::reason::map`]) | 402 with its reason, body withheld |
//! | `success: false`, `settlement_pending` | — | `Unknown`: 503 `settlement_outcome_unknown` |
//! | 429 (+ `Retry-After`, seconds or date, capped) | 429, same `Retry-After` | 429, proof released |
//! | connection refused / DNS / TLS | retried, then 503 | retried, then 503, proof released |
//! | timeout, reset after sending, 5xx | retried, then 503 | `Unknown`: 503, proof kept |
//! | other 4xx, 3xx | 503 | 503, proof released (it refused to process the call) |
//! | oversized, malformed or inconsistent reply | 503 | `Unknown` (2xx) |
//!
//! Payment channels (`batch-settlement`): a `FacilitatorClient` is also a channel
//! [`Escrow`](crate::channel::serve::Escrow) (deposits, cooperative refunds) and claims and
//! settles channels; see [`channel`].
//!
//! Every reply is hostile input: bodies are capped
//! ([`max_body_bytes`](FacilitatorClientBuilder::max_body_bytes), 64 KiB), typed parsing
//! never panics, a facilitator's `payer` must be the authorization's `from`, and reason
//! strings reach clients only if they are known x402 codes; others become
//! `facilitator_rejected`, their text kept (bounded) in the error for logs.
//!
//! Solana `exact` (features `facilitator` + `svm`): the transaction is checked in-process as
//! `svm::SvmVerifier` does before `/verify`; the route advertises the
//! facilitator's fee payer ([`Supported::svm_fee_payer`]); a settlement's `transaction` must be
//! the fee payer's signature over that very transaction (else the outcome is unknown, as for a
//! malformed reply) and lands in [`Settlement::signature`].

mod auth;
mod builder;
pub mod channel;
mod error;
mod http;
mod supported;
mod svm;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use ::http::StatusCode;
use alloy_primitives::{Address, B256, U256};
use async_trait::async_trait;
use bytes::Bytes;

pub use auth::{AuthFn, AuthHeaders, AuthRequest, BearerToken, Endpoint, NoAuth, auth_fn};
pub use builder::FacilitatorClientBuilder;
pub use error::{BuildError, FacilitatorError};
pub use supported::{Supported, SupportedKind};

use self::http::{Failure, Reply, Transport, backoff, retry_after};
use self::supported::{Cache, Lookup};
use crate::Network;
use crate::clock::Clock;
use crate::proto::PaymentPayload;
use crate::proto::v2::PaymentRequirements;
use crate::settle::{SettleError, Settlement, Settler};
use crate::verify::{VerifiedPayment, Verifier, VerifyError};

/// An x402 facilitator over HTTP(S): a [`Verifier`] and a [`Settler`]. Cheap to clone (one
/// `Arc`); clones share the connection pool and the `/supported` cache. See the
/// [module docs](self).
#[derive(Clone)]
pub struct FacilitatorClient {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    base: String,
    settings: Settings,
    cache: Cache,
    /// Channel deposits whose outcome is unknown (`channel.rs`).
    deposits: channel::InDoubt,
    clock: Arc<dyn Clock>,
    v1_resource: String,
}

/// What [`FacilitatorClientBuilder`] sets and every call reads, kept as it was built.
#[derive(Clone, Copy, Debug)]
struct Settings {
    verify_timeout: Duration,
    settle_timeout: Duration,
    supported_timeout: Duration,
    attempts: u32,
    backoff_base: Duration,
    backoff_cap: Duration,
    max_retry_after: Duration,
    check_supported: bool,
    refresh_every: Duration,
    retry_every: Duration,
    max_skew: u64,
}

impl std::fmt::Debug for FacilitatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("FacilitatorClient")
            .field("url", &i.base)
            .field("verify_timeout", &i.settings.verify_timeout)
            .field("settle_timeout", &i.settings.settle_timeout)
            .field("max_attempts", &i.settings.attempts)
            .finish_non_exhaustive()
    }
}

impl FacilitatorClient {
    /// A client for the facilitator at `url` with the defaults of [`FacilitatorClientBuilder`].
    ///
    /// # Errors
    /// As [`FacilitatorClientBuilder::build`].
    pub fn new(url: impl Into<String>) -> Result<Self, BuildError> {
        Self::builder(url).build()
    }

    /// A builder for the facilitator at `url` (e.g. `https://x402.org/facilitator`; a trailing
    /// `/` is dropped).
    pub fn builder(url: impl Into<String>) -> FacilitatorClientBuilder {
        FacilitatorClientBuilder::new(url.into())
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    /// Fetches `GET /supported` now (with retries) and caches it: call it at startup to fail
    /// fast on a wrong URL or credentials, and so the first paid request does not wait for it.
    ///
    /// # Errors
    /// The facilitator could not be reached or answered something else than a
    /// `SupportedResponse`.
    pub async fn supported(&self) -> Result<Arc<Supported>, FacilitatorError> {
        let fetched = self.fetch_supported_with(true).await;
        let ok = fetched.as_ref().ok().cloned();
        self.inner.cache.store(ok);
        fetched?;
        self.inner
            .cache
            .current()
            .ok_or(FacilitatorError::Inconsistent(
                "supported cache is poisoned",
            ))
    }

    /// The cached `/supported` answer, if one was fetched.
    pub fn cached_supported(&self) -> Option<Arc<Supported>> {
        self.inner.cache.current()
    }

    /// `GET /supported`, retried when `retry`; a request waiting for it makes one attempt.
    async fn fetch_supported_with(&self, retry: bool) -> Result<Supported, FacilitatorError> {
        let i = &self.inner;
        let reply = if retry {
            self.idempotent(Endpoint::Supported, None, i.settings.supported_timeout)
                .await
                .map_err(|(e, _)| e)?
        } else {
            i.transport
                .call(Endpoint::Supported, None, i.settings.supported_timeout)
                .await
                .map_err(Failure::into_error)?
        };
        if !reply.status.is_success() {
            return Err(status_error(&reply));
        }
        parse(&reply.body)
    }

    /// Why the cached `/supported` refuses this payment, fetching it first if there is none
    /// yet. `None` when allowed, or when nothing is known (`/verify` then decides).
    async fn supported_refusal(&self, payload: &PaymentPayload) -> Option<crate::reason::Reason> {
        let i = &self.inner;
        if !i.settings.check_supported {
            return None;
        }
        let refusal =
            |s: &Supported| s.refusal(payload.version(), payload.scheme(), payload.network());
        match i
            .cache
            .lookup(i.settings.refresh_every, i.settings.retry_every)
        {
            Lookup::Cached { copy, refresh } => {
                if refresh {
                    self.spawn_refresh();
                }
                refusal(&copy)
            }
            Lookup::Unknown => None,
            Lookup::Missing => {
                let _first = i.cache.first_fetch().await;
                // Whoever held the lock before us may have fetched it (or failed to).
                if let Lookup::Missing = i
                    .cache
                    .lookup(i.settings.refresh_every, i.settings.retry_every)
                {
                    // One bounded attempt: paying requests wait for it, and `/verify` decides
                    // without it.
                    let fetched = self.fetch_supported_with(false).await;
                    trace_supported_failure(&fetched);
                    i.cache.store(fetched.ok());
                }
                i.cache.current().and_then(|s| refusal(&s))
            }
        }
    }

    fn spawn_refresh(&self) {
        let this = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let fetched = this.fetch_supported_with(true).await;
                    trace_supported_failure(&fetched);
                    this.inner.cache.store(fetched.ok());
                });
            }
            // Not on a runtime (cannot happen inside a served request): try again next time.
            Err(_) => self.inner.cache.abandon_refresh(),
        }
    }

    /// One call, repeated while repeating is safe (the endpoint has no side effect): on
    /// transport failures, 408 and 5xx. Returns the first other answer, or the last failure
    /// and the `Retry-After` it came with.
    async fn idempotent(
        &self,
        endpoint: Endpoint,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Reply, (FacilitatorError, Option<Duration>)> {
        let i = &self.inner;
        let mut attempt = 1;
        loop {
            let (error, wait) = match i.transport.call(endpoint, body.clone(), timeout).await {
                Ok(reply) if !retryable_status(reply.status) => return Ok(reply),
                Ok(reply) => (
                    status_error(&reply),
                    retry_after(&reply.headers, i.settings.max_retry_after),
                ),
                Err(failure) => (failure.into_error(), None),
            };
            // A facilitator asking for a longer pause than our backoff is not hammered.
            let pause = backoff(attempt, i.settings.backoff_base, i.settings.backoff_cap);
            if attempt >= i.settings.attempts || wait.is_some_and(|w| w > i.settings.backoff_cap) {
                return Err((error, wait));
            }
            tokio::time::sleep(wait.map_or(pause, |w| w.max(pause))).await;
            attempt += 1;
        }
    }

    /// Cheap checks before spending a facilitator call, and the [`VerifiedPayment`] the
    /// facilitator is asked to vouch for (its `facilitator_request` is set after `/verify`).
    fn precheck(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        if payload.scheme() != req.scheme {
            return Err(VerifyError::Scheme(payload.scheme().to_owned()));
        }
        if payload.network() != req.network {
            return Err(VerifyError::NetworkMismatch {
                paid: payload.network(),
                required: req.network,
            });
        }
        // Bounds how long the nonce store keeps the proof, as the in-process verifier does;
        // the reference facilitator sets no upper bound.
        let latest = self
            .inner
            .clock
            .now()
            .saturating_add(req.max_timeout_seconds)
            .saturating_add(self.inner.settings.max_skew);
        // Solana: the proof's claim lasts until its blockhash has surely expired (svm.rs).
        #[cfg(feature = "svm")]
        if req.network.is_solana() {
            return svm::precheck(payload, req, &self.inner.clock);
        }
        // The layer needs the typed proof (replay key, expiry, handler info), so only the
        // payload shapes it knows can pass, whatever else the facilitator supports.
        let verified = match req.scheme.as_str() {
            crate::verify::exact::SCHEME => {
                let exact = crate::verify::exact::paying(payload, req)?;
                VerifiedPayment::exact(
                    payload.version(),
                    req.network,
                    req.asset.evm().unwrap_or_default(),
                    exact.authorization,
                    exact.signature,
                )
            }
            crate::verify::upto::SCHEME => crate::verify::upto::unverified(payload, req)?,
            _ => {
                return Err(VerifyError::Other {
                    reason: crate::reason::UNSUPPORTED_SCHEME,
                });
            }
        };
        let valid_before = U256::from(verified.valid_before);
        if valid_before > U256::from(latest) {
            return Err(VerifyError::ValidityTooLong {
                valid_before,
                max: latest,
            });
        }
        Ok(verified)
    }
}

fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT
}

fn status_error(reply: &Reply) -> FacilitatorError {
    FacilitatorError::Status {
        status: reply.status,
        excerpt: error::excerpt(&String::from_utf8_lossy(&reply.body), 200),
    }
}

/// A reply document: a JSON object of type `T`. (serde would also read a struct from a JSON
/// array of its fields in order, so `[true]` would pass as `{"isValid": true}`.)
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FacilitatorError> {
    let malformed = |source| FacilitatorError::Malformed {
        source,
        excerpt: error::excerpt(&String::from_utf8_lossy(body), 200),
    };
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(malformed)?;
    T::deserialize(serde_json::Value::Object(object)).map_err(malformed)
}

/// A 32-byte `0x` hash, or `None` (absent, empty or malformed).
fn tx_hash(s: Option<&str>) -> Option<B256> {
    s.filter(|s| !s.is_empty())?.parse().ok()
}

fn unavailable(e: FacilitatorError, retry_after: Option<Duration>) -> VerifyError {
    VerifyError::Unavailable {
        retry_after,
        source: Box::new(e),
    }
}

#[cfg(feature = "tracing")]
fn trace_supported_failure(r: &Result<Supported, FacilitatorError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "x402 facilitator: GET /supported failed; keeping the cached copy");
    }
}

#[cfg(not(feature = "tracing"))]
fn trace_supported_failure(_: &Result<Supported, FacilitatorError>) {}

#[async_trait]
impl Verifier for FacilitatorClient {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        let verified = self.precheck(payload, requirements)?;
        if let Some(reason) = self.supported_refusal(payload).await {
            return Err(VerifyError::Other { reason });
        }
        let i = &self.inner;
        let body = wire::request_body(payload, requirements, &i.v1_resource).map_err(|source| {
            unavailable(
                FacilitatorError::Malformed {
                    source,
                    excerpt: String::new(),
                },
                None,
            )
        })?;
        let body = Bytes::from(body);
        let reply = self
            .idempotent(
                Endpoint::Verify,
                Some(body.clone()),
                i.settings.verify_timeout,
            )
            .await
            .map_err(|(e, wait)| unavailable(e, wait))?;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(VerifyError::RateLimited {
                retry_after: retry_after(&reply.headers, i.settings.max_retry_after),
            });
        }
        let answer = match parse::<wire::VerifyReply>(&reply.body) {
            Ok(a) if reply.status.is_success() => a,
            // A refusal in an error status is still a refusal (the reference client reads
            // `isValid` from any status).
            Ok(a) if !a.is_valid => a,
            Ok(_) => return Err(unavailable(status_error(&reply), None)),
            Err(e) if reply.status.is_success() => return Err(unavailable(e, None)),
            Err(_) => return Err(unavailable(status_error(&reply), None)),
        };
        if !answer.is_valid {
            let reason = wire::reason::map(answer.invalid_reason.as_deref());
            return Err(VerifyError::Rejected {
                reason,
                detail: wire::detail(
                    answer.invalid_reason.as_deref(),
                    answer.invalid_message.as_deref(),
                ),
            });
        }
        #[cfg(feature = "svm")]
        if let (Some(proof), Some(payer)) = (verified.svm(), &answer.payer) {
            svm::same_payer(proof, payer)?;
            return Ok(verified.with_backend_data(FacilitatorRequest(body)));
        }
        if let Some(payer) = &answer.payer {
            let Ok(payer) = payer.parse::<Address>() else {
                return Err(unavailable(
                    FacilitatorError::Inconsistent("payer is not an address"),
                    None,
                ));
            };
            // The facilitator vouches for someone else than the authorization's signer.
            if payer != verified.payer {
                return Err(VerifyError::WrongSigner {
                    recovered: payer,
                    expected: verified.payer,
                });
            }
        }
        Ok(verified.with_backend_data(FacilitatorRequest(body)))
    }
}

/// The `{x402Version, paymentPayload, paymentRequirements}` JSON `/verify` approved, carried
/// from verification to settlement inside the payment: `/settle` sends these very bytes, so
/// the facilitator settles exactly the proof and the server requirements it verified.
#[derive(Clone)]
struct FacilitatorRequest(Bytes);

#[async_trait]
impl Settler for FacilitatorClient {
    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        let i = &self.inner;
        let Some(FacilitatorRequest(body)) = payment.backend_data::<FacilitatorRequest>().cloned()
        else {
            return Err(SettleError::Unavailable {
                retry_after: None,
                source: Box::new(FacilitatorError::NotVerifiedByFacilitator),
            });
        };
        let body: Bytes = if payment.is_upto() {
            // The request /verify approved, with the metered amount to settle in place of
            // the maximum (the reference facilitator re-verifies against the permit's own).
            wire::with_amount(&body, payment.amount).map_err(|source| SettleError::Unavailable {
                retry_after: None,
                source: Box::new(FacilitatorError::Malformed {
                    source,
                    excerpt: String::new(),
                }),
            })?
        } else {
            body
        };
        let reply = match self.settle_call(body).await {
            Ok(reply) => reply,
            Err(Failure::NotSent(e)) => {
                return Err(SettleError::Unavailable {
                    retry_after: None,
                    source: Box::new(e),
                });
            }
            // May have reached it, and it has no status endpoint to ask: never resent.
            Err(Failure::MaybeSent(e)) => {
                return Err(SettleError::Unknown {
                    transaction: None,
                    retry_after: None,
                    source: Box::new(e),
                });
            }
        };
        settle_reply(i, payment, &reply)
    }
}

impl FacilitatorClient {
    /// One `POST /settle`, repeated only while it surely did not reach the facilitator
    /// (repeating cannot settle twice); the last failure otherwise.
    async fn settle_call(&self, body: Bytes) -> Result<Reply, Failure> {
        let i = &self.inner;
        let mut attempt = 1;
        loop {
            match i
                .transport
                .call(
                    Endpoint::Settle,
                    Some(body.clone()),
                    i.settings.settle_timeout,
                )
                .await
            {
                // Dropped: the next attempt's error, if any, is the one reported.
                Err(Failure::NotSent(_)) if attempt < i.settings.attempts => {
                    tokio::time::sleep(backoff(
                        attempt,
                        i.settings.backoff_base,
                        i.settings.backoff_cap,
                    ))
                    .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// What a `/settle` answer means for the payment.
fn settle_reply(
    i: &Inner,
    payment: &VerifiedPayment,
    reply: &Reply,
) -> Result<Settlement, SettleError> {
    let wait = retry_after(&reply.headers, i.settings.max_retry_after);
    let unknown = |e: FacilitatorError, transaction| SettleError::Unknown {
        transaction,
        retry_after: wait,
        source: Box::new(e),
    };
    if reply.status == StatusCode::TOO_MANY_REQUESTS {
        return Err(SettleError::RateLimited { retry_after: wait });
    }
    // It may have broadcast before failing: whatever the body says, the outcome is unknown.
    if reply.status.is_server_error() {
        return Err(unknown(status_error(reply), None));
    }
    let answer = match parse::<wire::SettleReply>(&reply.body) {
        Ok(a) if reply.status.is_success() || !a.success => a,
        Err(e) if reply.status.is_success() => return Err(unknown(e, None)),
        // A 3xx/4xx without a typed refusal: it declined to process the call.
        _ => {
            return Err(SettleError::Unavailable {
                retry_after: wait,
                source: Box::new(status_error(reply)),
            });
        }
    };
    let transaction = tx_hash(answer.transaction.as_deref());
    if !answer.success {
        let detail = wire::detail(
            answer.error_reason.as_deref(),
            answer.error_message.as_deref(),
        );
        if answer.error_reason.as_deref() == Some(wire::reason::SETTLEMENT_PENDING.as_str()) {
            return Err(unknown(FacilitatorError::Pending { detail }, transaction));
        }
        let reason = wire::reason::map(answer.error_reason.as_deref());
        #[cfg(feature = "tracing")]
        tracing::info!(
            reason = reason.as_str(),
            detail,
            "x402 facilitator refused the settlement"
        );
        return Err(SettleError::Refused {
            reason,
            transaction,
        });
    }
    // Solana: the id is a base58 signature, checked against the transaction (svm.rs).
    #[cfg(feature = "svm")]
    if let Some(proof) = payment.svm() {
        return svm::settled(proof, payment.network, &answer).map_err(|e| unknown(e, None));
    }
    let Some(transaction) = transaction else {
        return Err(unknown(
            FacilitatorError::Inconsistent("success without a transaction hash"),
            None,
        ));
    };
    if let Some(network) = &answer.network
        && network.parse::<Network>() != Ok(payment.network)
    {
        return Err(unknown(
            FacilitatorError::Inconsistent("settled on another network"),
            Some(transaction),
        ));
    }
    if let Some(payer) = &answer.payer
        && payer.parse::<Address>() != Ok(payment.payer)
    {
        return Err(unknown(
            FacilitatorError::Inconsistent("settled for another payer"),
            Some(transaction),
        ));
    }
    // upto: what it says it moved must be what we asked for (the layer writes the receipt's
    // amount); an exact reply's `amount` is not read.
    if payment.is_upto()
        && let Some(amount) = answer.amount.as_deref().filter(|a| !a.is_empty())
        && crate::proto::decimal::parse(amount) != Some(payment.amount)
    {
        return Err(unknown(
            FacilitatorError::Inconsistent("settled another amount"),
            Some(transaction),
        ));
    }
    Ok(Settlement {
        transaction: Some(transaction),
        amount: None,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates() {
        assert!(FacilitatorClient::new("https://x402.org/facilitator/").is_ok());
        let c = FacilitatorClient::new("http://127.0.0.1:9/base//").unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:9/base");
        assert_eq!(
            c.inner.transport.settle.url.as_str(),
            "http://127.0.0.1:9/base/settle"
        );
        for bad in ["", "x402.org", "ftp://x402.org", "/facilitator", "http://"] {
            assert!(
                matches!(FacilitatorClient::new(bad), Err(BuildError::Url(_))),
                "{bad:?}"
            );
        }
        let slow_connect = FacilitatorClient::builder("http://h")
            .connect_timeout(Duration::from_secs(5))
            .verify_timeout(Duration::from_secs(5))
            .build();
        assert!(matches!(slow_connect, Err(BuildError::Setting(_))));
        assert!(matches!(
            FacilitatorClient::builder("http://h")
                .max_attempts(0)
                .build(),
            Err(BuildError::Setting(_))
        ));
    }
}
