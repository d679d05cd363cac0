//! Reading the payment header, and choosing which of the route's options it may pay.

use http::HeaderMap;

use crate::challenge::Binding;
use crate::config::{ResourceCheck, Shared};
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
            // Built once: the resource check and the bound challenge both need it.
            let url = if p.resource.is_some() || shared.challenges.is_some() {
                resource.url(shared)
            } else {
                String::new()
            };
            if let Some(echoed) = &p.resource
                && !names(shared.resource_check, &echoed.url, &url)
            {
                return Err(pay(reason::RESOURCE_MISMATCH));
            }
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
                    url: &url,
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

/// Whether a proof's echoed `resource.url` names the resource this request's challenge
/// names (`expected`), as far as `check` asks. Compared piece by piece, normalised on the fly:
/// nothing is allocated (official clients echo `resource` in every paid request).
fn names(check: ResourceCheck, echoed: &str, expected: &str) -> bool {
    if check == ResourceCheck::Off {
        return true;
    }
    let (echoed, expected) = (Url::parse(echoed), Url::parse(expected));
    let origin = match (check, &expected.origin) {
        // Without a Host header nor a base, the server knows no origin to compare.
        (ResourceCheck::Url, Some((scheme, host))) => echoed
            .origin
            .is_some_and(|(s, h)| s.eq_ignore_ascii_case(scheme) && h.eq_ignore_ascii_case(host)),
        _ => true,
    };
    let query = match (echoed.query, expected.query) {
        (Some(a), Some(b)) => same_escaped(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    origin && same_escaped(echoed.path, expected.path) && query
}

/// A URL cut into what [`names`] compares, borrowed from the text.
struct Url<'a> {
    /// Scheme and `host[:port]` (compared without ASCII case), the scheme's default port
    /// dropped. A scheme holds no `/` and a host no `/`, so the pair is as unique as the
    /// `scheme://host` text it is cut from.
    origin: Option<(&'a str, &'a str)>,
    /// Never empty: `/` when the URL has no path.
    path: &'a str,
    /// Absent when empty.
    query: Option<&'a str>,
}

impl<'a> Url<'a> {
    /// Never fails: text without `scheme://` is a path (as `resource.url` is without a
    /// `Host`), so hostile input only ever compares unequal.
    fn parse(url: &'a str) -> Self {
        let url = url.split_once('#').map_or(url, |(u, _)| u);
        let (origin, rest) = match url.split_once("://") {
            Some((scheme, rest)) if !scheme.is_empty() && !scheme.contains(['/', '?']) => {
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                let host = &rest[..end];
                let default_port = if scheme.eq_ignore_ascii_case("http") {
                    ":80"
                } else if scheme.eq_ignore_ascii_case("https") {
                    ":443"
                } else {
                    ""
                };
                // Digits and ':' have no case: stripping before or after lower-casing agrees.
                let host = match host.strip_suffix(default_port) {
                    Some(h) if !default_port.is_empty() => h,
                    _ => host,
                };
                (Some((scheme, host)), &rest[end..])
            }
            _ => (None, url),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, (!q.is_empty()).then_some(q)),
            None => (rest, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        Self {
            origin,
            path,
            query,
        }
    }
}

/// Whether `a` and `b` are equal once normalised ([`Normalised`]).
fn same_escaped(a: &str, b: &str) -> bool {
    Normalised::new(a).eq(Normalised::new(b))
}

/// The bytes of `s` under RFC 3986 §6.2.2 normalisation of escapes: `%74` (an unreserved
/// character) is `t`, `%2f` is `%2F` (still an escape: a router tells `/a%2Fb` from `/a/b`).
/// Broken escapes and other bytes pass as they are.
struct Normalised<'a> {
    rest: &'a [u8],
    /// The rest of an escape being written out (`2`, `F` of `%2F`).
    pending: [u8; 2],
    pending_len: u8,
}

impl<'a> Normalised<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            rest: s.as_bytes(),
            pending: [0; 2],
            pending_len: 0,
        }
    }
}

impl Iterator for Normalised<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        if self.pending_len > 0 {
            let i = 2 - usize::from(self.pending_len);
            self.pending_len -= 1;
            return Some(self.pending[i]);
        }
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        let (&first, rest) = self.rest.split_first()?;
        if first == b'%'
            && let (Some(h), Some(l)) = (hex(rest.first()), hex(rest.get(1)))
        {
            self.rest = &rest[2..];
            // Both digits are < 16: the byte fits.
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                return Some(c);
            }
            const UPPER: &[u8; 16] = b"0123456789ABCDEF";
            self.pending = [UPPER[usize::from(c >> 4)], UPPER[usize::from(c & 15)]];
            self.pending_len = 2;
            return Some(b'%');
        }
        self.rest = rest;
        Some(first)
    }
}

/// v1 echoes only scheme and network: narrow by what the authorization pays. Options that
/// differ only by token are told apart by the signature's domain (verify each). If none
/// matches, the first one's verification gives the precise reason.
fn narrow_v1(candidates: &mut Vec<&PaymentOption>, payload: &v1::PaymentPayload) {
    if let Ok(exact) = ExactEvmPayload::from_json(payload.payload.get()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The normalised text (the comparison's bytes, collected).
    fn normalise(s: &str) -> String {
        String::from_utf8(Normalised::new(s).collect()).unwrap()
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded_others_upper_cased() {
        assert_eq!(normalise("/wea%74her"), "/weather");
        assert_eq!(normalise("/a%2fb%7E"), "/a%2Fb~");
        assert_eq!(normalise("/%e2%82%ac"), "/%E2%82%AC");
        // Broken escapes and non-ASCII are kept as they are.
        assert_eq!(normalise("%"), "%");
        assert_eq!(normalise("/%zz%4"), "/%zz%4");
        assert_eq!(normalise("/pré%"), "/pré%");
    }

    #[test]
    fn paths_and_queries_are_compared_origins_only_in_url_mode() {
        let expected = "http://api.test/paid?x=1";
        for (check, echoed, same) in [
            (ResourceCheck::Path, "https://cdn.example/paid?x=1", true),
            (ResourceCheck::Path, "/paid?x=1#f", true),
            (ResourceCheck::Path, "http://api.test/paid?x=2", false),
            (ResourceCheck::Path, "http://api.test/paid/?x=1", false),
            (ResourceCheck::Url, "HTTP://API.test:80/paid?x=1", true),
            (ResourceCheck::Url, "https://api.test/paid?x=1", false),
            (ResourceCheck::Url, "/paid?x=1", false),
            (ResourceCheck::Off, "garbage", true),
        ] {
            assert_eq!(names(check, echoed, expected), same, "{check:?} {echoed}");
        }
        // Without a Host nor a base the server knows no origin: the path decides.
        assert!(names(ResourceCheck::Url, "https://x.example/paid", "/paid"));
    }

    /// The comparison before it stopped allocating (normalised `String`s, a formatted
    /// origin), kept as the reference [`names`] must agree with.
    fn names_by_strings(check: ResourceCheck, echoed: &str, expected: &str) -> bool {
        fn parse(url: &str) -> (Option<String>, String, Option<String>) {
            let url = url.split_once('#').map_or(url, |(u, _)| u);
            let (origin, rest) = match url.split_once("://") {
                Some((scheme, rest)) if !scheme.is_empty() && !scheme.contains(['/', '?']) => {
                    let end = rest.find(['/', '?']).unwrap_or(rest.len());
                    let scheme = scheme.to_ascii_lowercase();
                    let host = rest[..end].to_ascii_lowercase();
                    let default_port = match scheme.as_str() {
                        "http" => ":80",
                        "https" => ":443",
                        _ => "",
                    };
                    let host = match host.strip_suffix(default_port) {
                        Some(h) if !default_port.is_empty() => h.to_owned(),
                        _ => host,
                    };
                    (Some(format!("{scheme}://{host}")), &rest[end..])
                }
                _ => (None, url),
            };
            let (path, query) = match rest.split_once('?') {
                Some((p, q)) => (p, (!q.is_empty()).then_some(q)),
                None => (rest, None),
            };
            let path = if path.is_empty() { "/" } else { path };
            (origin, normalise(path), query.map(normalise))
        }
        if check == ResourceCheck::Off {
            return true;
        }
        let (echoed, expected) = (parse(echoed), parse(expected));
        let origin = match (check, &expected.0) {
            (ResourceCheck::Url, Some(origin)) => echoed.0.as_ref() == Some(origin),
            _ => true,
        };
        origin && echoed.1 == expected.1 && echoed.2 == expected.2
    }

    #[test]
    fn names_agrees_with_the_string_comparison() {
        let urls = [
            "http://api.test/paid?x=1",
            "HTTP://API.TEST:80/paid?x=1",
            "https://api.test:443/paid?x=1",
            "https://api.test:80/paid?x=1",
            "http://api.test:443/paid",
            "http://api.test/paid",
            "http://api.test/paid?",
            "http://api.test/paid?#f",
            "http://api.test",
            "http://api.test?x=1",
            "http://api.test/",
            "http://Api.Test/P%61id?x=%31",
            "http://api.test/%50aid?x=1",
            "http://api.test/a%2fb",
            "http://api.test/a%2Fb",
            "http://api.test/a/b",
            "http://api.test/%",
            "http://api.test/%4",
            "http://api.test/%zz",
            "http://api.test/pré?q=é",
            "http://api.tést/paid",
            "ftp://api.test/paid",
            "FTP://api.test:80/paid",
            "a:://b/paid",
            "a://:b/paid",
            "://api.test/paid",
            "/paid?x=1",
            "/paid",
            "paid",
            "",
            "?",
            "#",
            "http:/api.test/paid",
            "x/y://api.test/paid",
            "http://api.test:8080/paid",
            "http://API.test:8080/paid",
        ];
        let checks = [ResourceCheck::Off, ResourceCheck::Path, ResourceCheck::Url];
        let mut equal = 0;
        for check in checks {
            for a in urls {
                for b in urls {
                    let want = names_by_strings(check, a, b);
                    assert_eq!(names(check, a, b), want, "{check:?} {a:?} {b:?}");
                    equal += usize::from(want && a != b);
                }
            }
        }
        // The list has pairs that differ as text and still name one resource.
        assert!(equal > 20, "{equal}");
    }
}
