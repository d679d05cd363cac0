//! `GET /supported`: what the facilitator settles, fetched once and refreshed in the
//! background.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Deserialize;

use crate::Network;
use crate::proto::X402Version;

/// A facilitator's `GET /supported` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Supported {
    /// The (version, scheme, network) triples it verifies and settles.
    pub kinds: Vec<SupportedKind>,
    /// Extension keys it understands.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Addresses it settles from, by CAIP family pattern (`eip155:*`).
    #[serde(default)]
    pub signers: BTreeMap<String, Vec<String>>,
}

/// One entry of [`Supported::kinds`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    /// The protocol version (1 or 2).
    pub x402_version: u64,
    /// The scheme (`exact`).
    pub scheme: String,
    /// The network as that version writes it (`base-sepolia`, `eip155:84532`), or a CAIP-2
    /// pattern (`eip155:*`).
    pub network: String,
    /// Scheme data: for `upto`, the `facilitatorAddress` that settles (and that payers sign
    /// into their permits).
    #[serde(default)]
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl SupportedKind {
    pub(super) fn covers(&self, network: Network) -> bool {
        if let Some(prefix) = self.network.strip_suffix('*') {
            return network.caip2().starts_with(prefix);
        }
        self.network.parse::<Network>() == Ok(network)
    }
}

impl Supported {
    /// The account that settles `upto` payments on `network` (`extra.facilitatorAddress` of
    /// its v2 `upto` kind): what to pass to
    /// [`PaymentOption::upto`](crate::PaymentOption::upto) when this facilitator settles.
    pub fn upto_facilitator(&self, network: Network) -> Option<alloy_primitives::Address> {
        self.kinds
            .iter()
            .filter(|k| k.x402_version == 2 && k.scheme == crate::verify::upto::SCHEME)
            .filter(|k| k.covers(network))
            .find_map(|k| {
                k.extra
                    .as_ref()?
                    .get(crate::verify::upto::FACILITATOR_ADDRESS)?
                    .as_str()?
                    .parse()
                    .ok()
            })
    }

    /// Why a payment of `version`/`scheme` on `network` cannot go to this facilitator:
    /// `None` when it can. The reason is the one the layer would give for a route that does
    /// not offer it (`invalid_x402_version`, `unsupported_scheme`, `invalid_network`).
    pub fn refusal(
        &self,
        version: X402Version,
        scheme: &str,
        network: Network,
    ) -> Option<crate::reason::Reason> {
        use crate::reason;
        let number = u64::from(version.number());
        let same_version = || self.kinds.iter().filter(|k| k.x402_version == number);
        if same_version().next().is_none() {
            return Some(reason::INVALID_X402_VERSION);
        }
        if !same_version().any(|k| k.scheme == scheme) {
            return Some(reason::UNSUPPORTED_SCHEME);
        }
        if !same_version().any(|k| k.scheme == scheme && k.covers(network)) {
            return Some(reason::INVALID_NETWORK);
        }
        None
    }
}

/// The cached copy and when to refresh it.
#[derive(Default)]
pub(crate) struct Cache {
    state: RwLock<State>,
    /// One refresh in flight at a time.
    refreshing: AtomicBool,
    /// Serializes the very first fetch, so a burst at startup makes one call.
    first: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    copy: Option<std::sync::Arc<Supported>>,
    /// When the last attempt (successful or not) finished.
    tried: Option<Instant>,
    /// Whether it succeeded.
    ok: bool,
}

/// What a request should do about the cache.
pub(crate) enum Lookup {
    /// Use this copy; `refresh` when it is due (the caller spawns the refresh).
    Cached {
        copy: std::sync::Arc<Supported>,
        refresh: bool,
    },
    /// No copy yet and no recent failure: fetch one (under [`Cache::first_fetch`]).
    Missing,
    /// No copy, and the last fetch failed recently: go on without one.
    Unknown,
}

impl Cache {
    pub(crate) fn lookup(
        &self,
        refresh_every: std::time::Duration,
        retry_every: std::time::Duration,
    ) -> Lookup {
        let Ok(state) = self.state.read() else {
            return Lookup::Unknown;
        };
        let due = |every| state.tried.is_none_or(|t| t.elapsed() >= every);
        let interval = if state.ok { refresh_every } else { retry_every };
        match &state.copy {
            Some(copy) => {
                let refresh = due(interval) && !self.refreshing.swap(true, Ordering::AcqRel);
                Lookup::Cached {
                    copy: copy.clone(),
                    refresh,
                }
            }
            None if due(retry_every) => Lookup::Missing,
            None => Lookup::Unknown,
        }
    }

    pub(crate) fn current(&self) -> Option<std::sync::Arc<Supported>> {
        self.state.read().ok()?.copy.clone()
    }

    pub(crate) async fn first_fetch(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.first.lock().await
    }

    /// Gives up a refresh that could not be started; the next lookup may try again.
    pub(crate) fn abandon_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// Records a fetch: a new copy replaces the old one; a failure keeps the old one.
    pub(crate) fn store(&self, fetched: Option<Supported>) {
        if let Ok(mut state) = self.state.write() {
            state.tried = Some(Instant::now());
            state.ok = fetched.is_some();
            if let Some(s) = fetched {
                state.copy = Some(std::sync::Arc::new(s));
            }
        }
        self.refreshing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Supported {
        serde_json::from_str(
            r#"{"kinds":[{"x402Version":2,"scheme":"exact","network":"eip155:84532"},
                {"x402Version":1,"scheme":"exact","network":"base-sepolia"},
                {"x402Version":2,"scheme":"exact","network":"solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"},
                {"x402Version":2,"scheme":"upto","network":"eip155:*"}],
              "extensions":[],"signers":{"eip155:*":["0xf39F"]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn refusal_by_version_scheme_network() {
        let s = reference();
        let v2 = X402Version::V2;
        assert_eq!(s.refusal(v2, "exact", Network::BASE_SEPOLIA), None);
        assert_eq!(
            s.refusal(X402Version::V1, "exact", Network::BASE_SEPOLIA),
            None
        );
        assert_eq!(
            s.refusal(v2, "exact", Network::BASE),
            Some(crate::reason::Reason::InvalidNetwork)
        );
        assert_eq!(
            s.refusal(X402Version::V1, "exact", Network::BASE),
            Some(crate::reason::Reason::InvalidNetwork)
        );
        assert_eq!(
            s.refusal(v2, "streaming", Network::BASE_SEPOLIA),
            Some(crate::reason::Reason::UnsupportedScheme)
        );
        assert_eq!(
            s.refusal(v2, "upto", Network::BASE),
            None,
            "eip155:* pattern"
        );
        let v2_only = Supported {
            kinds: vec![s.kinds[0].clone()],
            ..Supported::default()
        };
        assert_eq!(
            v2_only.refusal(X402Version::V1, "exact", Network::BASE_SEPOLIA),
            Some(crate::reason::Reason::InvalidX402Version)
        );
    }

    #[test]
    fn cache_refreshes_once_and_keeps_a_stale_copy() {
        use std::time::Duration;
        let cache = Cache::default();
        let (every, retry) = (Duration::ZERO, Duration::from_secs(3600));
        assert!(matches!(cache.lookup(every, retry), Lookup::Missing));
        cache.store(None);
        assert!(matches!(cache.lookup(every, retry), Lookup::Unknown));
        cache.store(Some(reference()));
        // Due (interval zero): exactly one caller is told to refresh.
        assert!(matches!(
            cache.lookup(every, retry),
            Lookup::Cached { refresh: true, .. }
        ));
        assert!(matches!(
            cache.lookup(every, retry),
            Lookup::Cached { refresh: false, .. }
        ));
        // A failed refresh keeps the copy.
        cache.store(None);
        assert!(matches!(cache.lookup(every, retry), Lookup::Cached { .. }));
        assert_eq!(cache.current().unwrap().kinds.len(), 4);
    }
}
