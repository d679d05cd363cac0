//! What a built layer holds, shared by every service clone: read per request by the service
//! and the responses it writes. The builder (`layer`) fills it; nothing here knows the builder
//! or the service, so the request path imports configuration, never the other way round.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::request::Parts;
use serde_json::{Map, Value};

use crate::challenge::ChallengeKeys;
use crate::hooks::PaymentHooks;
use crate::idempotency::IdempotencyStore;
use crate::nonce::NonceStore;
use crate::option::PaymentOption;
use crate::settle::{SettlementMode, Settler};
use crate::verify::Verifier;

/// Decides per request what a call costs: `None` makes the request free.
pub type PricingFn = dyn Fn(&Parts) -> Option<Arc<[PaymentOption]>> + Send + Sync;

pub(crate) enum Pricing {
    Static(Arc<[PaymentOption]>),
    Dynamic(Arc<PricingFn>),
}

/// What a layer needs per request; shared by every service clone (one refcount per call).
pub(crate) struct Shared {
    pub(crate) verifier: Arc<dyn Verifier>,
    pub(crate) store: Arc<dyn NonceStore>,
    pub(crate) settler: Arc<dyn Settler>,
    pub(crate) mode: SettlementMode,
    pub(crate) pricing: Pricing,
    pub(crate) resource_base: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) mime_type: Option<String>,
    pub(crate) max_header_bytes: usize,
    pub(crate) expose_headers: bool,
    pub(crate) retry_after: Duration,
    pub(crate) accept_v1: bool,
    pub(crate) accept_v2: bool,
    pub(crate) hooks: Arc<[Arc<dyn PaymentHooks>]>,
    pub(crate) inflight: Option<Inflight>,
    pub(crate) challenges: Option<ChallengeKeys>,
    pub(crate) idempotency: Option<Idempotency>,
    /// `extensions` of the v2 challenge (`None` when no extension is offered).
    pub(crate) extensions: Option<Map<String, Value>>,
    /// Prepaid bundles and sign-in (see [`crate::prepaid`]).
    pub(crate) prepaid: Option<crate::prepaid::State>,
}

/// Idempotent retries, configured as one value (see [`crate::idempotency`]): the store, and
/// the settings that mean nothing without it.
///
/// ```
/// use tower_x402::idempotency::{Idempotency, MemoryIdempotencyStore};
/// let idem = Idempotency::new(MemoryIdempotencyStore::new())
///     .required(true)
///     .max_body(16 * 1024);
/// # let _ = idem;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) required: bool,
    pub(crate) max_body: usize,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("required", &self.required)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    /// Idempotent retries kept in `store`; ids optional, bodies up to 64 KiB stored.
    pub fn new(store: impl IdempotencyStore) -> Self {
        Self {
            store: Arc::new(store),
            required: false,
            max_body: crate::idempotency::DEFAULT_MAX_BODY,
        }
    }

    /// Requires a payment identifier in v2 payments (default `false`; advertised as
    /// `info.required`): a v2 payment without one gets 400 `payment_identifier_required`.
    /// v1 payments cannot carry one and are served without idempotency.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Largest response body stored for replay (default 64 KiB). Larger and streaming bodies
    /// pass through unbuffered and are not replayable.
    #[must_use]
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

impl<S: IdempotencyStore> From<S> for Idempotency {
    fn from(store: S) -> Self {
        Self::new(store)
    }
}

/// A non-blocking counting semaphore: beyond `max`, callers are turned away, not queued.
pub(crate) struct Inflight {
    max: usize,
    now: AtomicUsize,
}

impl Inflight {
    /// At most `max` at once.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            now: AtomicUsize::new(0),
        }
    }
}

/// One slot of an [`Inflight`], given back on drop.
pub(crate) struct InflightPermit<'a>(&'a AtomicUsize);

impl Inflight {
    pub(crate) fn try_acquire(&self) -> Option<InflightPermit<'_>> {
        let taken = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then(|| n + 1)
            })
            .is_ok();
        // `then`, not `then_some`: a permit built eagerly and dropped would give back a slot
        // it never took.
        taken.then(|| InflightPermit(&self.now))
    }
}

impl Drop for InflightPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
