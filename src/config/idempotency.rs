//! Idempotent retries as one sub-config.

use std::sync::Arc;

use crate::idempotency::IdempotencyStore;

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

    setters! {
        /// Requires a payment identifier in v2 payments (default `false`; advertised as
        /// `info.required`): a v2 payment without one gets 400 `payment_identifier_required`.
        /// v1 payments cannot carry one and are served without idempotency.
        #[must_use]
        pub fn required(required: bool) => required = required;

        /// Largest response body stored for replay (default 64 KiB). Larger and streaming bodies
        /// pass through unbuffered and are not replayable.
        #[must_use]
        pub fn max_body(bytes: usize) => max_body = bytes;
    }
}

impl<S: IdempotencyStore> From<S> for Idempotency {
    fn from(store: S) -> Self {
        Self::new(store)
    }
}
