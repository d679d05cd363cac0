//! How a proof's echoed `resource.url` must name the request it pays for.

/// How much of a v2 proof's echoed `resource.url` must name the request it pays for (set
/// with [`resource_check`](crate::PaymentLayerBuilder::resource_check)); a proof naming
/// something else is refused before verification with 402 `resource_mismatch`.
///
/// Paths and queries are compared after RFC 3986 normalisation (escapes of unreserved
/// characters decoded, other escapes upper-cased), nothing more: `/weather/`, `/WEATHER`,
/// `//weather` and `/weather;x=1` are other resources than `/weather`, as they are to a router.
/// A v2 proof without `resource` (optional on the wire) and v1 proofs (no resource at all)
/// are not checked. The echo is not signed by the payer: this stops a proof bought for one
/// route being spent on another of the same price, not an attacker who rewrites the echo;
/// [bound challenges](crate::challenge) add a server MAC over the URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResourceCheck {
    /// Not checked: any proof for the right price and payee pays any route.
    Off,
    /// Path and query must be the request's (default). Scheme and host may differ: behind a
    /// proxy or several domains the client may have seen another origin than the server does.
    #[default]
    Path,
    /// Scheme, host and port as well (default ports ignored, case-insensitive), for
    /// deployments whose `resource.url` origin is fixed ([`resource_base`](crate::PaymentLayerBuilder::resource_base))
    /// or always the request's `Host`.
    Url,
}
