//! What a built layer holds, shared by every service clone: read per request by the service
//! and the responses it writes. The builder (`layer`) fills it; nothing here knows the builder
//! or the service, so the request path imports configuration, never the other way round.
//! Each concern has its module: [`pricing`] (what a request costs), [`idempotency`]
//! (idempotent retries as one sub-config), [`inflight`] (the verification concurrency cap),
//! [`resource`] (how a proof's echoed resource must name the request).

mod idempotency;
mod inflight;
mod pricing;
mod resource;

pub use idempotency::Idempotency;
pub(crate) use inflight::Inflight;
pub(crate) use pricing::Pricing;
pub use pricing::PricingFn;
pub use resource::ResourceCheck;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::challenge::ChallengeKeys;
use crate::hooks::PaymentHooks;
use crate::nonce::NonceStore;
use crate::settle::{SettlementMode, Settler};
use crate::verify::Verifier;

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
    /// `serviceName`, `tags` and `iconUrl` of the challenge's `resource` (bazaar).
    pub(crate) service: ServiceMeta,
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
    /// How a v2 proof's `resource.url` must name the request.
    pub(crate) resource_check: ResourceCheck,
    /// Serves `batch-settlement` payloads (see [`crate::channel`]).
    pub(crate) channels: Option<Arc<dyn crate::channel::Serve>>,
    /// The page browsers get instead of the 402 JSON.
    #[cfg(feature = "paywall")]
    pub(crate) paywall: Option<crate::paywall::Built>,
}

/// Service metadata of the challenge's `resource` (bazaar: `serviceName`, `tags`, `iconUrl`),
/// validated by the builder (`discovery::service_meta`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceMeta {
    pub(crate) name: Option<String>,
    pub(crate) tags: Option<Vec<String>>,
    pub(crate) icon_url: Option<String>,
}
