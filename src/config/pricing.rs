//! What a request costs: the route's options, fixed or chosen per request.

use std::sync::Arc;

use http::request::Parts;

use crate::option::PaymentOption;

/// Decides per request what a call costs: `None` makes the request free.
pub type PricingFn = dyn Fn(&Parts) -> Option<Arc<[PaymentOption]>> + Send + Sync;

pub(crate) enum Pricing {
    Static(Arc<[PaymentOption]>),
    Dynamic(Arc<PricingFn>),
}
