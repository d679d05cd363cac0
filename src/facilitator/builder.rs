//! [`FacilitatorClientBuilder`]: settings, their defaults, and validation.

use std::sync::Arc;
use std::time::Duration;

use super::auth::{AuthHeaders, Endpoint, NoAuth};
use super::error::BuildError;
use super::http::{Target, Transport};
use super::supported::Cache;
use super::{FacilitatorClient, Inner, Settings};
use crate::clock::{Clock, SystemClock};

/// Configures a [`FacilitatorClient`]. Every setting has a default suited to a public
/// facilitator on Base.
#[must_use]
pub struct FacilitatorClientBuilder {
    url: String,
    auth: Arc<dyn AuthHeaders>,
    connect_timeout: Duration,
    settings: Settings,
    max_body: usize,
    clock: Arc<dyn Clock>,
    v1_resource: String,
}

impl std::fmt::Debug for FacilitatorClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FacilitatorClientBuilder")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl FacilitatorClientBuilder {
    pub(super) fn new(url: String) -> Self {
        Self {
            url,
            auth: Arc::new(NoAuth),
            connect_timeout: Duration::from_secs(3),
            settings: Settings {
                verify_timeout: Duration::from_secs(10),
                settle_timeout: Duration::from_secs(60),
                supported_timeout: Duration::from_secs(10),
                attempts: 3,
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_secs(2),
                max_retry_after: Duration::from_secs(60),
                check_supported: true,
                refresh_every: Duration::from_secs(600),
                retry_every: Duration::from_secs(30),
                max_skew: crate::verify::ExactEvmVerifier::DEFAULT_MAX_SKEW,
            },
            max_body: 64 * 1024,
            clock: Arc::new(SystemClock),
            v1_resource: "x402:resource".to_owned(),
        }
    }

    setters! {
        /// Auth headers for every call (default: none). See [`AuthHeaders`].
        pub fn auth(auth: impl AuthHeaders) => auth = Arc::new(auth);

        /// Time to open a connection (TCP + TLS), default 3 s. Must be shorter than every call
        /// timeout: a call that fails to connect surely sent nothing, and may be retried.
        pub fn connect_timeout(timeout: Duration) => connect_timeout = timeout;
    }

    setters! {
        /// Deadline of one `/verify` attempt, reply body included (default 10 s).
        pub fn verify_timeout(timeout: Duration) => settings.verify_timeout = timeout;

        /// Deadline of the `/settle` call, reply body included (default 60 s: facilitators wait
        /// for the transaction's receipt). Past it the outcome is unknown (503, proof kept).
        pub fn settle_timeout(timeout: Duration) => settings.settle_timeout = timeout;

        /// Deadline of one `/supported` attempt (default 10 s).
        pub fn supported_timeout(timeout: Duration) => settings.supported_timeout = timeout;

        /// Attempts per call where repeating is safe (default 3, at least 1): `/verify` and
        /// `/supported` on transport errors, 408 and 5xx; `/settle` only when nothing was sent.
        pub fn max_attempts(attempts: u32) => settings.attempts = attempts;
    }

    /// Backoff before retry n: a random wait in `[d, 1.5 d]`, `d = base * 2^(n-1)` at most
    /// `cap` (default 100 ms and 2 s): jitter never shortens the wait.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.settings.backoff_base = base;
        self.settings.backoff_cap = cap;
        self
    }

    setters! {
        /// Longest `Retry-After` passed on from the facilitator (default 60 s).
        pub fn max_retry_after(cap: Duration) => settings.max_retry_after = cap;

        /// Largest reply body read (default 64 KiB, at least 1 KiB); larger replies fail the call.
        pub fn max_body_bytes(bytes: usize) => max_body = bytes;

        /// Refuse early (402) payments the cached `/supported` rules out (default on).
        pub fn check_supported(on: bool) => settings.check_supported = on;

        /// How old the cached `/supported` may get before a background refresh (default 10 min).
        /// After a failed fetch, the next is tried after 30 s.
        pub fn supported_refresh(every: Duration) => settings.refresh_every = every;

        /// Time source for the upper bound on `validBefore` (tests inject a fixed clock).
        pub fn clock(clock: impl Clock) => clock = Arc::new(clock);

        /// Accepts `validBefore` up to `now + maxTimeoutSeconds + secs` (default 60), as
        /// [`ExactEvmVerifier::with_max_skew`](crate::verify::ExactEvmVerifier::with_max_skew).
        pub fn max_skew(secs: u64) => settings.max_skew = secs;

        /// `resource` of the v1 requirements sent for v1 payments (a verifier does not see the
        /// request URL, and v1 facilitators require a non-empty string; default `x402:resource`).
        pub fn v1_resource(resource: impl Into<String>) => v1_resource = resource.into();
    }

    /// Builds the client.
    ///
    /// # Errors
    /// The URL is not absolute `http(s)`; the connect timeout is not shorter than every call
    /// timeout; zero attempts; a body cap under 1 KiB; an empty v1 resource; the TLS stack
    /// cannot be set up.
    pub fn build(self) -> Result<FacilitatorClient, BuildError> {
        let base = self.url.trim_end_matches('/').to_owned();
        let target = |endpoint: Endpoint| -> Result<Target, BuildError> {
            let full = format!("{base}{}", endpoint.path());
            let url = reqwest::Url::parse(&full).map_err(|_| BuildError::Url(self.url.clone()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(BuildError::Url(self.url.clone()));
            }
            let uri = full
                .parse::<::http::Uri>()
                .map_err(|_| BuildError::Url(self.url.clone()))?;
            Ok(Target { url, uri })
        };
        let (verify, settle, supported) = (
            target(Endpoint::Verify)?,
            target(Endpoint::Settle)?,
            target(Endpoint::Supported)?,
        );
        let set = &self.settings;
        let shortest = set
            .verify_timeout
            .min(set.settle_timeout)
            .min(set.supported_timeout);
        if self.connect_timeout >= shortest {
            return Err(BuildError::Setting(
                "connect timeout must be shorter than every call timeout",
            ));
        }
        if set.attempts == 0 {
            return Err(BuildError::Setting("max_attempts must be at least 1"));
        }
        if self.max_body < 1024 {
            return Err(BuildError::Setting("max_body_bytes must be at least 1024"));
        }
        if self.v1_resource.is_empty() {
            return Err(BuildError::Setting("v1_resource must not be empty"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            // A redirected POST /settle would be sent twice; facilitators are called at their
            // final URL.
            .redirect(reqwest::redirect::Policy::none())
            // Every repeat is decided above, where it is known to be safe.
            .retry(reqwest::retry::never())
            .user_agent(concat!("tower-x402/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError::Http(e.into()))?;
        Ok(FacilitatorClient {
            inner: Arc::new(Inner {
                transport: Transport {
                    client,
                    auth: self.auth,
                    verify,
                    settle,
                    supported,
                    max_body: self.max_body,
                },
                base,
                settings: self.settings,
                cache: Cache::default(),
                deposits: Default::default(),
                clock: self.clock,
                v1_resource: self.v1_resource,
            }),
        })
    }
}
