//! Reading the payment header, and choosing which of the route's options it may pay.

use http::HeaderMap;

use crate::challenge::Binding;
use crate::config::Shared;
use crate::option::PaymentOption;
use crate::proto::exact::ExactEvmPayload;
use crate::proto::header;
use crate::proto::{PaymentPayload, v1};
use crate::rejection::{Rejection, reason};
use crate::response::Resource;

/// Reads the payment header: `Ok(None)` when there is none.
pub(super) fn decode(
    shared: &Shared,
    headers: &HeaderMap,
) -> Result<Option<PaymentPayload>, Rejection> {
    let limits = header::Limits {
        max_bytes: shared.max_header_bytes,
        v1: shared.accept_v1,
        v2: shared.accept_v2,
    };
    Ok(header::decode_payload(headers, limits)?)
}

/// The server's own options the payload may pay for, best first. The client's `accepted`
/// copy only picks them: verification runs against the server's requirements. With bound
/// challenges, a v2 `accepted` must also carry a valid challenge id for this request.
pub(super) fn select<'a>(
    shared: &Shared,
    options: &'a [PaymentOption],
    payload: &PaymentPayload,
    resource: &Resource,
) -> Result<Vec<&'a PaymentOption>, Rejection> {
    let pay = |reason| Rejection::Pay {
        reason: Some(reason),
    };
    let same_scheme = |o: &&PaymentOption| o.requirements().scheme == payload.scheme();
    if !options.iter().any(|o| same_scheme(&o)) {
        return Err(pay(reason::UNSUPPORTED_SCHEME));
    }
    let on_network =
        |o: &&PaymentOption| same_scheme(o) && o.requirements().network == payload.network();
    let mut candidates: Vec<_> = options.iter().filter(on_network).collect();
    if candidates.is_empty() {
        return Err(pay(reason::INVALID_NETWORK));
    }
    match payload {
        PaymentPayload::V2(p) => {
            let a = &p.accepted;
            candidates.retain(|o| {
                let r = o.requirements();
                r.asset == a.asset && r.pay_to == a.pay_to && r.amount == a.amount
            });
            if candidates.is_empty() {
                return Err(pay(reason::INVALID_PAYMENT_REQUIREMENTS));
            }
            if let (Some(keys), Some(first)) = (&shared.challenges, candidates.first()) {
                // The candidates agree on everything the id binds (scheme, network, asset,
                // payTo, amount): one check covers them all.
                let binding = Binding {
                    url: &resource.url(shared),
                    method: resource.method.as_str(),
                    requirements: first.requirements(),
                };
                keys.check_echo(a, &binding).map_err(|e| pay(e.reason()))?;
            }
        }
        PaymentPayload::V1(p) => narrow_v1(&mut candidates, p),
    }
    Ok(candidates)
}

/// v1 echoes only scheme and network: narrow by what the authorization pays. Options that
/// differ only by token are told apart by the signature's domain (verify each). If none
/// matches, the first one's verification gives the precise reason.
fn narrow_v1(candidates: &mut Vec<&PaymentOption>, payload: &v1::PaymentPayload) {
    if let Ok(exact) = serde_json::from_str::<ExactEvmPayload>(payload.payload.get()) {
        let a = &exact.authorization;
        let pays = |o: &&&PaymentOption| {
            o.requirements().pay_to == a.to && o.requirements().amount == a.value
        };
        if candidates.iter().any(|o| pays(&o)) {
            candidates.retain(|o| pays(&o));
        }
    }
    candidates.truncate(MAX_V1_CANDIDATES);
}

/// Bound on signature checks one v1 proof can cost.
const MAX_V1_CANDIDATES: usize = 4;
