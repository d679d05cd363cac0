//! Bound challenges: a server-issued, stateless challenge id in each 402 requirement, which a
//! v2 client must echo back (in `accepted.extra.challenge`) for its proof to be accepted.
//!
//! **On by default** for v2: a layer built without keys binds with the random key of its
//! process ([`ChallengeKeys::process`], shared by every layer of the process). Several
//! instances behind a load balancer need the same key on each, set with
//! [`PaymentLayerBuilder::bind_challenges`](crate::PaymentLayerBuilder::bind_challenges)
//! (for example [`ChallengeKeys::from_env`]); a layer with a shared store (Redis) and no key
//! fails to build with
//! [`ConfigError::ChallengeKeyRequired`](crate::error::ConfigError::ChallengeKeyRequired).
//! Opting out is explicit:
//! [`PaymentLayerBuilder::no_challenge_binding`](crate::PaymentLayerBuilder::no_challenge_binding).
//!
//! # What it adds
//!
//! Without binding the layer already verifies every proof against the route's **own**
//! requirements, so a client cannot pay less or pay someone else. A bound challenge also
//! proves that the requirement the client paid against was issued by this server, for this
//! resource URL, HTTP method and price, and not longer ago than its time to live: a price
//! change invalidates the old challenges, and a proof cannot be prepared from a requirement the
//! server never sent for that resource.
//!
//! It is **not** a replay guard (one challenge id may back several payments while it is valid;
//! each payment's nonce is still claimed once in the [`NonceStore`](crate::NonceStore)), and
//! it does not bind the payer: whoever sees a challenge can pay with it. Nor does it bind a
//! *signed payment* to the resource: the id travels in `accepted`, which the payer does not
//! sign (EIP-3009 signs only `from`, `to`, `value`, the validity window and the nonce), so
//! whoever holds an unused proof can attach a fresh id for another route of the same price.
//!
//! # Wire format
//!
//! `extra.challenge` is unpadded base64url ([RFC 4648 §5]) of 45 bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `2` (ids of format `1` are still accepted) |
//! | 4 | key id: the first 4 bytes of `HMAC-SHA256(key, "tower-x402 challenge key id")` |
//! | 8 | expiry, Unix seconds, big-endian |
//! | 16 | random salt |
//! | 16 | `HMAC-SHA256(key, …)` truncated to 128 bits |
//!
//! The MAC covers a domain tag, the resource URL (as in `resource.url`), the HTTP method, and
//! the requirement's scheme, network (chain id), amount, asset and `payTo`, each
//! length-prefixed or fixed-width, zero-padded to whole SHA-256 blocks; then the version, key
//! id, expiry and salt. It is compared in constant time. The binding comes first so that the
//! hash state after it is the same for every id of one resource, method and price: it is
//! kept per thread, and issuing or checking an id costs two SHA-256 compressions instead of
//! five. (Format `1` absorbed the id's fields first, then the same binding unpadded, under
//! another domain tag; such ids are still checked, as issued.) Clients treat the id as
//! opaque: the official ones copy the requirement they chose, `extra` included, into
//! `accepted`.
//!
//! The EIP-712 domain is taken from the server's own requirement (`extra.name` and
//! `extra.version`), which carries no challenge: adding one changes nothing the payer signs.
//!
//! # Keys and rotation
//!
//! [`ChallengeKeys`] holds a current key, which signs and verifies, and optionally a previous
//! one, which only verifies. To rotate: deploy `new(k2).with_previous(k1)` everywhere, then,
//! once the longest time to live has passed, `new(k2)` alone. Every instance behind a load
//! balancer needs the same keys; keep them in your secret store, as 32 random bytes.
//!
//! # v1 clients
//!
//! A v1 proof (`X-PAYMENT`) names only scheme and network, never the requirement, so it cannot
//! carry a challenge. By default a bound layer serves them unbound, checked against the
//! route's requirements as usual (and their nonce claimed once, as always).
//! [`ChallengeKeys::accept_unbound_v1`]`(false)` refuses them (402 `invalid_x402_version`; the
//! challenge still goes out in both dialects, so v2-capable clients pay with v2).
//!
//! [RFC 4648 §5]: https://www.rfc-editor.org/rfc/rfc4648#section-5

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock::{Clock, SystemClock};
use crate::kept::Kept;
use crate::proto::v2::PaymentRequirements;

/// The key of `extra` that carries the challenge id.
pub const EXTRA_FIELD: &str = "challenge";

/// The environment variable [`ChallengeKeys::from_env`] reads the current key from.
pub const ENV_KEY: &str = "X402_CHALLENGE_KEY";
/// The environment variable [`ChallengeKeys::from_env`] reads the previous key from (optional).
pub const ENV_PREVIOUS_KEY: &str = "X402_CHALLENGE_KEY_PREVIOUS";

const VERSION: u8 = 2;
/// The first format: the id's fields absorbed before the binding ([`Key::mac_v1`]).
const VERSION_1: u8 = 1;
const KEY_ID_LEN: usize = 4;
const SALT_LEN: usize = 16;
const MAC_LEN: usize = 16;
/// Decoded length: version, key id, expiry, salt, MAC.
const RAW_LEN: usize = 1 + KEY_ID_LEN + 8 + SALT_LEN + MAC_LEN;
/// Encoded length (unpadded base64 of [`RAW_LEN`] bytes).
const ENCODED_LEN: usize = (RAW_LEN * 4).div_ceil(3);
const DOMAIN_V1: &[u8] = b"tower-x402 challenge v1\0";
const DOMAIN: &[u8] = b"tower-x402 challenge v2\0";
/// SHA-256's block: the binding is padded to whole ones.
const BLOCK: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// One key: its id and the HMAC state after absorbing it (cloned per use, so the key schedule
/// runs once, at configuration).
#[derive(Clone)]
struct Key {
    id: [u8; KEY_ID_LEN],
    /// Tells this key's states apart in the per-thread cache ([`BINDINGS`]): 128 bits of
    /// `HMAC(key, "…key id")` (the id is its first 4 bytes).
    print: [u8; 16],
    mac: HmacSha256,
}

impl Key {
    fn new(secret: &[u8; 32]) -> Self {
        // HMAC accepts keys of any length; 32 bytes can't fail.
        let mac = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
        let mut ider = mac.clone();
        ider.update(b"tower-x402 challenge key id");
        let full = ider.finalize().into_bytes();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&full[..KEY_ID_LEN]);
        let mut print = [0u8; 16];
        print.copy_from_slice(&full[..16]);
        Self { id, print, mac }
    }

    /// The MAC state over everything a format-2 id binds, ready to finalize: the state after
    /// the binding's blocks (from the per-thread cache), then the id's own fields (29 bytes:
    /// with SHA-256's padding, one block).
    fn mac(&self, expiry: u64, salt: &[u8; SALT_LEN], binding: &Binding<'_>) -> HmacSha256 {
        let mut m = BINDINGS.with_borrow_mut(|cache| cache.state(self, binding));
        m.update(&[VERSION]);
        m.update(&self.id);
        m.update(&expiry.to_be_bytes());
        m.update(salt);
        m
    }

    /// The MAC state over everything a format-1 id binds: the id's fields, then the binding.
    fn mac_v1(&self, expiry: u64, salt: &[u8; SALT_LEN], binding: &Binding<'_>) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(DOMAIN_V1);
        m.update(&[VERSION_1]);
        m.update(&self.id);
        m.update(&expiry.to_be_bytes());
        m.update(salt);
        let field = |m: &mut HmacSha256, bytes: &[u8]| {
            // Lengths are prefixed so that ("ab", "c") and ("a", "bc") differ.
            m.update(&(bytes.len() as u64).to_be_bytes());
            m.update(bytes);
        };
        field(&mut m, binding.url.as_bytes());
        field(&mut m, binding.method.as_bytes());
        let r = binding.requirements;
        field(&mut m, r.scheme.as_bytes());
        field(&mut m, b"eip155");
        m.update(&r.network.chain_id().to_be_bytes());
        m.update(&r.amount.to_be_bytes::<32>());
        m.update(r.asset.as_slice());
        m.update(r.pay_to.as_slice());
        m
    }
}

/// The bytes of `binding` a format-2 MAC starts with: the domain tag, then each field
/// length-prefixed or fixed-width (so the fields are read back unambiguously), zero-padded to
/// whole blocks.
fn binding_blocks(binding: &Binding<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(DOMAIN);
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(out, binding.url.as_bytes());
    field(out, binding.method.as_bytes());
    let r = binding.requirements;
    field(out, r.scheme.as_bytes());
    field(out, b"eip155");
    out.extend_from_slice(&r.network.chain_id().to_be_bytes());
    out.extend_from_slice(&r.amount.to_be_bytes::<32>());
    out.extend_from_slice(r.asset.as_slice());
    out.extend_from_slice(r.pay_to.as_slice());
    out.resize(out.len().next_multiple_of(BLOCK), 0);
}

thread_local! {
    /// The HMAC states after recent bindings' blocks, on this thread.
    static BINDINGS: std::cell::RefCell<Bindings> = const {
        std::cell::RefCell::new(Bindings { slots: Kept::new(), scratch: Vec::new() })
    };
}

/// The HMAC states after the binding blocks of recent (key, binding) pairs: every id of one
/// resource, method and price starts its MAC the same, so only its own fields are hashed.
/// A state is found by the key's [`Key::print`] and the binding's very bytes.
struct Bindings {
    slots: Kept<BindingState, { Bindings::SLOTS }>,
    /// The binding's bytes, built per call (kept: no allocation once grown).
    scratch: Vec<u8>,
}

struct BindingState {
    print: [u8; 16],
    blocks: Box<[u8]>,
    state: HmacSha256,
}

impl Bindings {
    /// States kept per thread: a server has a few routes, methods and prices.
    const SLOTS: usize = 8;

    /// `key`'s HMAC state after `binding`'s blocks.
    fn state(&mut self, key: &Key, binding: &Binding<'_>) -> HmacSha256 {
        binding_blocks(binding, &mut self.scratch);
        let blocks = &self.scratch[..];
        if let Some(kept) = self
            .slots
            .iter()
            .find(|s| s.print == key.print && *s.blocks == *blocks)
        {
            return kept.state.clone();
        }
        let mut state = key.mac.clone();
        state.update(blocks);
        let kept = BindingState {
            print: key.print,
            blocks: blocks.into(),
            state: state.clone(),
        };
        self.slots.keep(kept);
        state
    }
}

/// What a challenge id is bound to: the request and the server's requirement.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    /// The resource URL, as sent in `resource.url`.
    pub url: &'a str,
    /// The HTTP method (`GET`, `POST`, …).
    pub method: &'a str,
    /// The server's requirement (scheme, network, amount, asset and `payTo` are bound).
    pub requirements: &'a PaymentRequirements,
}

/// Why an echoed challenge id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChallengeError {
    /// `accepted.extra.challenge` is absent or not a string.
    #[error("no challenge id in accepted.extra.challenge")]
    Missing,
    /// Not the encoding of a challenge id (length, alphabet, version).
    #[error("challenge id is malformed")]
    Malformed,
    /// Made with a key this server no longer (or never) had.
    #[error("challenge id was issued with an unknown key")]
    UnknownKey,
    /// The MAC does not match: tampered, or issued for another resource, method or price.
    #[error("challenge id does not match this resource, method and price")]
    Mismatch,
    /// Authentic, but past its expiry.
    #[error("challenge id expired at {expired_at}")]
    Expired {
        /// Its expiry, Unix seconds.
        expired_at: u64,
    },
}

impl ChallengeError {
    /// The x402 reason code sent with the 402:
    /// [`CHALLENGE_EXPIRED`](crate::reason::CHALLENGE_EXPIRED) when expired,
    /// [`INVALID_CHALLENGE`](crate::reason::INVALID_CHALLENGE) otherwise.
    pub fn reason(&self) -> crate::reason::Reason {
        match self {
            Self::Expired { .. } => crate::reason::CHALLENGE_EXPIRED,
            _ => crate::reason::INVALID_CHALLENGE,
        }
    }

    /// True for [`ChallengeError::Expired`]: a fresh challenge will do.
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Expired { .. })
    }
}

/// Why challenge keys could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChallengeKeyError {
    /// The environment variable is not set (or not unicode).
    #[error(
        "environment variable {0} is not set: set it to 64 hex digits (32 random bytes), the same on every instance"
    )]
    NotSet(&'static str),
    /// Not 32 bytes written as 64 hex digits (an optional `0x` allowed).
    #[error("{0}: a challenge key must be 32 bytes written as 64 hex digits")]
    Malformed(&'static str),
    /// The operating system's random source failed: no key is better than a guessable one.
    #[error("the OS random source failed; cannot make a challenge key")]
    NoRandomness,
}

impl ChallengeKeyError {
    /// True when the variable is simply absent.
    pub fn is_not_set(&self) -> bool {
        matches!(self, Self::NotSet(_))
    }
}

/// The keys that issue and check challenge ids; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower_x402::challenge::ChallengeKeys;
/// let current = [7u8; 32]; // in production: 32 random bytes from your secret store
/// let previous = [3u8; 32];
/// let keys = ChallengeKeys::new(current)
///     .with_previous(previous)
///     .with_ttl(Duration::from_secs(120));
/// ```
#[derive(Clone)]
#[must_use]
pub struct ChallengeKeys {
    current: Key,
    previous: Option<Key>,
    ttl: Option<u64>,
    clock: Arc<dyn Clock>,
    unbound_v1: bool,
    /// Made by [`ChallengeKeys::random`]: valid in this process only.
    ephemeral: bool,
}

impl std::fmt::Debug for ChallengeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: never the keys.
        f.debug_struct("ChallengeKeys")
            .field("current", &hex(&self.current.id))
            .field("previous", &self.previous.as_ref().map(|k| hex(&k.id)))
            .field("ttl", &self.ttl)
            .field("unbound_v1", &self.unbound_v1)
            .field("ephemeral", &self.ephemeral)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ChallengeKeys {
    /// Issues and verifies with `current` (32 secret random bytes). Defaults: no previous
    /// key, time to live = the requirement's `maxTimeoutSeconds`, system clock, v1 proofs
    /// served unbound.
    pub fn new(current: [u8; 32]) -> Self {
        Self {
            current: Key::new(&current),
            previous: None,
            ttl: None,
            clock: Arc::new(SystemClock),
            unbound_v1: true,
            ephemeral: false,
        }
    }

    /// A fresh random key, known to this process only: what a layer binds with when no key
    /// is configured. Ids it issued are refused by other instances and after a restart (the
    /// client then pays against a fresh 402), so use it for one instance only.
    ///
    /// # Errors
    /// [`ChallengeKeyError::NoRandomness`] if the OS random source fails.
    pub fn random() -> Result<Self, ChallengeKeyError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| ChallengeKeyError::NoRandomness)?;
        let mut keys = Self::new(key);
        keys.ephemeral = true;
        Ok(keys)
    }

    /// The random key of this process ([`ChallengeKeys::random`], drawn once): what a layer
    /// binds with when no key is configured, so that every layer of the process shares it.
    ///
    /// # Errors
    /// [`ChallengeKeyError::NoRandomness`] if the OS random source fails (then every later
    /// call fails too: no key is better than a guessable one).
    pub fn process() -> Result<Self, ChallengeKeyError> {
        static KEY: std::sync::OnceLock<Option<[u8; 32]>> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).ok().map(|()| key)
        });
        let mut keys = Self::new(key.ok_or(ChallengeKeyError::NoRandomness)?);
        keys.ephemeral = true;
        Ok(keys)
    }

    /// A key written as 64 hex digits (an optional `0x` prefix; surrounding whitespace
    /// ignored), as kept in a secret store.
    ///
    /// ```
    /// use tower_x402::challenge::ChallengeKeys;
    /// let keys = ChallengeKeys::from_hex(&"ab".repeat(32)).unwrap();
    /// assert!(ChallengeKeys::from_hex("abcd").is_err());
    /// # let _ = keys;
    /// ```
    ///
    /// # Errors
    /// [`ChallengeKeyError::Malformed`] unless it is exactly 32 bytes of hex.
    pub fn from_hex(hex: &str) -> Result<Self, ChallengeKeyError> {
        parse_key(hex, "challenge key").map(Self::new)
    }

    /// Keys from the environment: the current key from [`ENV_KEY`] (`X402_CHALLENGE_KEY`) and,
    /// while rotating, the previous one from [`ENV_PREVIOUS_KEY`]
    /// (`X402_CHALLENGE_KEY_PREVIOUS`), each 64 hex digits. Every instance must see the same
    /// values.
    ///
    /// ```no_run
    /// use tower_x402::challenge::ChallengeKeys;
    /// use tower_x402::{Network, PaymentLayer};
    /// use tower_x402::primitives::address;
    /// let layer = PaymentLayer::builder()
    ///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
    ///     .price("$0.001")
    ///     .network(Network::BASE_SEPOLIA)
    ///     .bind_challenges(ChallengeKeys::from_env()?)
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ChallengeKeyError::NotSet`] without `X402_CHALLENGE_KEY`;
    /// [`ChallengeKeyError::Malformed`] if either variable is not 64 hex digits.
    pub fn from_env() -> Result<Self, ChallengeKeyError> {
        let current = std::env::var(ENV_KEY).map_err(|_| ChallengeKeyError::NotSet(ENV_KEY))?;
        let mut keys = Self::new(parse_key(&current, ENV_KEY)?);
        if let Ok(previous) = std::env::var(ENV_PREVIOUS_KEY) {
            keys = keys.with_previous(parse_key(&previous, ENV_PREVIOUS_KEY)?);
        }
        Ok(keys)
    }

    /// True for keys made by [`ChallengeKeys::random`]: valid in this process only.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    setters! {
        /// Also verifies ids issued with `previous` (the key being rotated out; default none).
        pub fn with_previous(previous: [u8; 32]) => previous = Some(Key::new(&previous));

        /// How long an issued id stays valid (default: the requirement's `maxTimeoutSeconds`).
        /// Whole seconds; at least one.
        pub fn with_ttl(ttl: Duration) => ttl = Some(ttl.as_secs().max(1));

        /// The clock for expiry (default: the system clock; tests inject a
        /// [`FixedClock`](crate::clock::FixedClock)).
        pub fn with_clock(clock: impl Clock) => clock = Arc::new(clock);

        /// Lets v1 proofs through unbound (default `true`, since a v1 payload cannot echo a
        /// challenge). `false` refuses them with 402 `invalid_x402_version`: v2 clients only.
        pub fn accept_unbound_v1(on: bool) => unbound_v1 = on;
    }

    /// Whether v1 proofs are let through unbound.
    pub fn accepts_unbound_v1(&self) -> bool {
        self.unbound_v1
    }

    /// A fresh challenge id for `binding`, signed with the current key.
    pub fn issue(&self, binding: &Binding<'_>) -> String {
        let ttl = self.ttl.unwrap_or(binding.requirements.max_timeout_seconds);
        let expiry = self.clock.now().saturating_add(ttl);
        let salt = salt();
        let tag = self
            .current
            .mac(expiry, &salt, binding)
            .finalize()
            .into_bytes();
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..5].copy_from_slice(&self.current.id);
        raw[5..13].copy_from_slice(&expiry.to_be_bytes());
        raw[13..29].copy_from_slice(&salt);
        raw[29..].copy_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks an echoed id against `binding`: authentic (current or previous key), for this
    /// URL, method and requirement, and not expired.
    ///
    /// # Errors
    /// See [`ChallengeError`].
    pub fn check(&self, id: &str, binding: &Binding<'_>) -> Result<(), ChallengeError> {
        // Length first: nothing longer is decoded.
        if id.len() != ENCODED_LEN {
            return Err(ChallengeError::Malformed);
        }
        let mut raw = [0u8; RAW_LEN];
        match URL_SAFE_NO_PAD.decode_slice(id, &mut raw) {
            Ok(RAW_LEN) => {}
            _ => return Err(ChallengeError::Malformed),
        }
        let (head, tag) = raw.split_at(RAW_LEN - MAC_LEN);
        let (version, rest) = head.split_at(1);
        let (key_id, rest) = rest.split_at(KEY_ID_LEN);
        let (expiry, salt) = rest.split_at(8);
        let v1 = match version {
            [VERSION] => false,
            [VERSION_1] => true,
            _ => return Err(ChallengeError::Malformed),
        };
        let expiry = u64::from_be_bytes(expiry.try_into().map_err(|_| ChallengeError::Malformed)?);
        let salt: &[u8; SALT_LEN] = salt.try_into().map_err(|_| ChallengeError::Malformed)?;
        let mut known = false;
        let mut authentic = false;
        for key in std::iter::once(&self.current).chain(self.previous.as_ref()) {
            if key.id != key_id {
                continue;
            }
            known = true;
            let mac = match v1 {
                true => key.mac_v1(expiry, salt, binding),
                false => key.mac(expiry, salt, binding),
            };
            // Constant-time comparison of the truncated tag.
            if mac.verify_truncated_left(tag).is_ok() {
                authentic = true;
                break;
            }
        }
        if !known {
            return Err(ChallengeError::UnknownKey);
        }
        if !authentic {
            return Err(ChallengeError::Mismatch);
        }
        if self.clock.now() > expiry {
            return Err(ChallengeError::Expired { expired_at: expiry });
        }
        Ok(())
    }

    /// Checks the id a v2 client echoed in `accepted.extra.challenge`.
    pub(crate) fn check_echo(
        &self,
        accepted: &PaymentRequirements,
        binding: &Binding<'_>,
    ) -> Result<(), ChallengeError> {
        let id = accepted
            .extra_str(EXTRA_FIELD)
            .ok_or(ChallengeError::Missing)?;
        self.check(id, binding)
    }
}

/// 32 bytes from 64 hex digits (optional `0x`, surrounding whitespace ignored).
fn parse_key(text: &str, what: &'static str) -> Result<[u8; 32], ChallengeKeyError> {
    secret_from_hex(text).ok_or(ChallengeKeyError::Malformed(what))
}

/// A 32-byte secret from 64 hex digits (optional `0x`, surrounding whitespace ignored), as
/// the crate's keys are kept in secret stores and environment variables; `None` otherwise,
/// with what a failed decode had written zeroed.
pub(crate) fn secret_from_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    let mut key = [0u8; 32];
    if alloy_primitives::hex::decode_to_slice(digits, &mut key).is_ok() {
        return Some(key);
    }
    key.fill(0);
    std::hint::black_box(&mut key);
    None
}

/// 16 random bytes. The salt only has to make ids unique (the key is the secret), so if the OS
/// generator fails, a process counter and the time stand in rather than failing the 402.
fn salt() -> [u8; SALT_LEN] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut s = [0u8; SALT_LEN];
    if getrandom::fill(&mut s).is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        s[..8].copy_from_slice(&n.to_be_bytes());
        s[8..].copy_from_slice(&nanos.to_be_bytes());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use crate::{Asset, PaymentOption};
    use alloy_primitives::{U256, address};

    fn req() -> PaymentRequirements {
        PaymentOption::exact(
            &Asset::usdc_base_sepolia(),
            "$0.001",
            address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
        )
        .unwrap()
        .requirements()
        .clone()
    }

    fn binding(r: &PaymentRequirements) -> Binding<'_> {
        Binding {
            url: "http://api.test/data",
            method: "GET",
            requirements: r,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let clock = FixedClock::new(1_000);
        let keys = ChallengeKeys::new([1; 32]).with_clock(clock.clone());
        let r = req();
        let id = keys.issue(&binding(&r));
        assert_eq!(id.len(), ENCODED_LEN);
        assert_eq!(ENCODED_LEN, 60);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(keys.check(&id, &binding(&r)), Ok(()));
        // Expiry is the requirement's maxTimeoutSeconds by default, inclusive.
        clock.set(1_000 + r.max_timeout_seconds);
        assert_eq!(keys.check(&id, &binding(&r)), Ok(()));
        clock.advance(1);
        assert_eq!(
            keys.check(&id, &binding(&r)),
            Err(ChallengeError::Expired {
                expired_at: 1_000 + r.max_timeout_seconds
            })
        );
        // Two ids for the same binding differ (salt).
        assert_ne!(keys.issue(&binding(&r)), keys.issue(&binding(&r)));
    }

    #[test]
    fn every_bound_field_matters() {
        let keys = ChallengeKeys::new([1; 32]).with_clock(FixedClock::new(1_000));
        let r = req();
        let id = keys.issue(&binding(&r));
        let mut other = r.clone();
        other.amount = U256::from(999);
        assert_eq!(
            keys.check(&id, &binding(&other)),
            Err(ChallengeError::Mismatch)
        );
        let mut other = r.clone();
        other.pay_to = address!("0x000000000000000000000000000000000000dEaD").into();
        assert_eq!(
            keys.check(&id, &binding(&other)),
            Err(ChallengeError::Mismatch)
        );
        let mut other = r.clone();
        other.asset = address!("0x000000000000000000000000000000000000dEaD").into();
        assert_eq!(
            keys.check(&id, &binding(&other)),
            Err(ChallengeError::Mismatch)
        );
        let mut other = r.clone();
        other.network = crate::Network::BASE;
        assert_eq!(
            keys.check(&id, &binding(&other)),
            Err(ChallengeError::Mismatch)
        );
        let post = Binding {
            method: "POST",
            ..binding(&r)
        };
        assert_eq!(keys.check(&id, &post), Err(ChallengeError::Mismatch));
        let elsewhere = Binding {
            url: "http://api.test/data2",
            ..binding(&r)
        };
        assert_eq!(keys.check(&id, &elsewhere), Err(ChallengeError::Mismatch));
        // Fields not bound (maxTimeoutSeconds, extra) do not matter.
        let mut same = r.clone();
        same.max_timeout_seconds = 5;
        same.extra = None;
        assert_eq!(keys.check(&id, &binding(&same)), Ok(()));
    }

    #[test]
    fn rotation() {
        let clock = FixedClock::new(1_000);
        let r = req();
        let old = ChallengeKeys::new([1; 32]).with_clock(clock.clone());
        let id = old.issue(&binding(&r));
        let rotated = ChallengeKeys::new([2; 32])
            .with_previous([1; 32])
            .with_clock(clock.clone());
        assert_eq!(rotated.check(&id, &binding(&r)), Ok(()));
        let dropped = ChallengeKeys::new([2; 32]).with_clock(clock);
        assert_eq!(
            dropped.check(&id, &binding(&r)),
            Err(ChallengeError::UnknownKey)
        );
    }

    #[test]
    fn malformed() {
        let keys = ChallengeKeys::new([1; 32]);
        let r = req();
        let id = keys.issue(&binding(&r));
        let b = binding(&r);
        for bad in [
            String::new(),
            "A".repeat(ENCODED_LEN),
            format!("{id}A"),
            id[1..].to_owned(),
            format!("+{}", &id[1..]),
            format!("{}=", &id[..ENCODED_LEN - 1]),
        ] {
            let got = keys.check(&bad, &b);
            assert!(got.is_err(), "{bad:?}");
            assert_eq!(got.unwrap_err().reason(), "invalid_challenge", "{bad:?}");
        }
        // The version byte is checked (format 1 is checked as format 1: its MAC differs).
        let mut raw = URL_SAFE_NO_PAD.decode(&id).unwrap();
        raw[0] = 1;
        assert_eq!(
            keys.check(&URL_SAFE_NO_PAD.encode(&raw), &b),
            Err(ChallengeError::Mismatch)
        );
        raw[0] = 3;
        assert_eq!(
            keys.check(&URL_SAFE_NO_PAD.encode(raw), &b),
            Err(ChallengeError::Malformed)
        );
    }

    /// A format-1 id, made as the first format made it.
    fn issue_v1(keys: &ChallengeKeys, expiry: u64, binding: &Binding<'_>) -> String {
        let salt = [9u8; SALT_LEN];
        let tag = keys
            .current
            .mac_v1(expiry, &salt, binding)
            .finalize()
            .into_bytes();
        let mut raw = vec![VERSION_1];
        raw.extend_from_slice(&keys.current.id);
        raw.extend_from_slice(&expiry.to_be_bytes());
        raw.extend_from_slice(&salt);
        raw.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn format_1_ids_are_still_checked() {
        let keys = ChallengeKeys::new([1; 32]).with_clock(FixedClock::new(1_000));
        let r = req();
        let id = issue_v1(&keys, 2_000, &binding(&r));
        assert_eq!(keys.check(&id, &binding(&r)), Ok(()));
        let post = Binding {
            method: "POST",
            ..binding(&r)
        };
        assert_eq!(keys.check(&id, &post), Err(ChallengeError::Mismatch));
        // The same fields under format 2 are another MAC.
        let mut raw = URL_SAFE_NO_PAD.decode(&id).unwrap();
        raw[0] = VERSION;
        let as_v2 = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            keys.check(&as_v2, &binding(&r)),
            Err(ChallengeError::Mismatch)
        );
    }

    /// The per-thread states give the MAC computed from scratch, whatever was cached before:
    /// more bindings than slots, in turn, under two keys, one of them with the other's id.
    #[test]
    fn cached_binding_states_are_the_uncached_mac() {
        let (k1, k2) = (Key::new(&[1; 32]), Key::new(&[2; 32]));
        // A key sharing k1's id (4 bytes) but not its secret: never k1's state.
        let twin = Key {
            id: k1.id,
            ..k2.clone()
        };
        let r = req();
        let urls: Vec<String> = (0..20)
            .map(|i| format!("http://api.test/{}", "x".repeat(i * 7)))
            .collect();
        let salt = [5u8; SALT_LEN];
        let scratch = |key: &Key, b: &Binding<'_>| {
            let mut blocks = Vec::new();
            binding_blocks(b, &mut blocks);
            assert_eq!(blocks.len() % BLOCK, 0);
            let mut m = key.mac.clone();
            m.update(&blocks);
            m.update(&[VERSION]);
            m.update(&key.id);
            m.update(&7u64.to_be_bytes());
            m.update(&salt);
            m.finalize().into_bytes()
        };
        for round in 0..3 {
            for (i, url) in urls.iter().enumerate() {
                let b = Binding {
                    url,
                    method: if i % 2 == 0 { "GET" } else { "POST" },
                    requirements: &r,
                };
                for key in [&k1, &twin, &k2] {
                    let got = key.mac(7, &salt, &b).finalize().into_bytes();
                    assert_eq!(got, scratch(key, &b), "round {round} url {i}");
                }
                assert_ne!(scratch(&k1, &b), scratch(&twin, &b));
            }
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let keys = ChallengeKeys::new([0xab; 32]);
        let s = format!("{keys:?}");
        assert!(!s.contains("abababab"), "{s}");
    }
}
