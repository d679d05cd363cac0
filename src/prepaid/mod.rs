//! Prepaid access: pay once for a bundle of calls (or a time window), then sign in.
//!
//! A route with [`PaymentLayerBuilder::prepaid`](crate::PaymentLayerBuilder::prepaid) sells a
//! [`Bundle`] instead of a single call:
//!
//! 1. Its 402 asks for the bundle price (an ordinary `exact` requirement) and declares the
//!    x402 [`sign-in-with-x`](siwx::EXTENSION) extension with a fresh, server-issued nonce.
//! 2. A settled payment grants the payer the bundle in the [`CreditLedger`]; the paying call
//!    is served and counts as the bundle's first call.
//! 3. Later calls carry a `SIGN-IN-WITH-X` header instead of a payment: an EIP-4361 message
//!    the payer signed over the nonce of a 402 (EIP-191 `personal_sign`). A valid one spends
//!    its nonce, takes one call from the ledger and runs the handler, with no payment and no
//!    settlement. The handler finds a [`SignedIn`] in the request extensions. EOA signatures
//!    are recovered in-process; smart wallets (ERC-1271, and ERC-6492 for wallets not deployed
//!    yet) sign in when [`Prepaid::contract_signatures`] is set (e.g. [`ProviderSignatures`]
//!    with the `onchain` feature), which asks the chain (see [`siwx`] and [`wallets`]).
//! 4. No credit left, or credit expired: 402 again (`prepaid_credit_exhausted`,
//!    `prepaid_credit_expired`) with a fresh challenge, to buy another bundle.
//!
//! | Situation | Status | `error` reason |
//! |---|---|---|
//! | header not base64 JSON of a sign-in message, a field with a line break, a bad address | 400 | `invalid_siwx_payload` |
//! | signature not 65 bytes of `0x` hex (with [`Prepaid::contract_signatures`]: not 1 to 8 KiB of `0x` hex, or a broken ERC-6492 wrapping) | 400 | `invalid_siwx_malformed_signature` |
//! | header larger than `max_header_bytes` | 431 | `invalid_payload` |
//! | `domain` / `uri` not this server's (`resource_base`) | 401 | `invalid_siwx_domain_mismatch` / `invalid_siwx_uri_mismatch` |
//! | version ≠ 1, type ≠ `eip191`, `signatureScheme` ≠ `eip191`, a chain the route does not offer | 401 | `invalid_siwx_unsupported_chain` |
//! | nonce not issued by this server, or its `issuedAt`/`expirationTime` altered | 401 | `invalid_siwx_nonce` |
//! | message older than its `expirationTime` ([`Prepaid::message_ttl`]) | 401 | `invalid_siwx_expired` |
//! | signature does not recover to `address` and (with [`Prepaid::contract_signatures`]) the chain's ERC-1271/6492 check says invalid, or has no RPC for the chain | 401 | `invalid_siwx_signature` |
//! | nonce already used (a replayed message) | 401 | `invalid_siwx_nonce_reused` |
//! | valid sign-in, no credit / credit used up | 402 | `prepaid_credit_exhausted` |
//! | valid sign-in, credit expired | 402 | `prepaid_credit_expired` |
//! | nonce store or ledger down; the chain's ERC-1271/6492 check failed or timed out (nonce not spent: the same header works once it is back) | 503 | `service_unavailable` |
//!
//! A handler answering ≥ 400 (or failing) gets its call refunded.
//!
//! **Ledger failures after a payment.** The money moved, so the paying call is served with
//! its receipt even if the ledger cannot take the bundle's credit. The grant is tried three
//! times; if the ledger is still down, it is kept in this instance's memory and applied before
//! the payer's next sign-in here (which answers 503 `service_unavailable` while the ledger
//! stays down, never `prepaid_credit_exhausted`), and
//! [`Alert::CreditGrant`] is raised at error level: after a
//! restart, or at another instance, the seller must credit it by hand. A refund after a failed
//! call is handled the same way ([`Alert::CreditRefund`]).
//!
//! **Official client.** `@x402/fetch` 2.27.0 signs in by itself once the `x402Client` has the
//! `@x402/extensions` SIWX client extension registered
//! (`client.registerExtension(createSIWxClientExtension({signers: [account]}))`): on a 402
//! that declares `sign-in-with-x` it retries once with the header; if that is still a 402, it
//! pays the first challenge. So every prepaid call costs it two round trips (402, then the
//! signed call), and the first purchase three.
//!
//! **Deployment.** Messages are bound to [`resource_base`](crate::PaymentLayerBuilder::resource_base)
//! (required), never to the request's `Host`. Instances behind one load balancer must share
//! the nonce key ([`Prepaid::nonce_key`]), the [`NonceStore`] and the
//! ledger. [`MemoryCreditLedger`] (the default) lives in one process; with feature `redis`,
//! `RedisCreditLedger` keeps the credit in Redis (one Lua script per operation), next to
//! `RedisNonceStore` on the same connection:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn demo(key: [u8; 32]) -> Result<(), Box<dyn std::error::Error>> {
//! use tower_x402::nonce::RedisNonceStore;
//! use tower_x402::prepaid::{Bundle, Prepaid, RedisCreditLedger};
//! let nonces = RedisNonceStore::connect("redis://127.0.0.1:6379/").await?;
//! let prepaid = Prepaid::new(Bundle::calls(100).for_price("$0.10"))
//!     .ledger(RedisCreditLedger::new(nonces.connection()))
//!     .nonce_key(key); // the same key on every instance
//! // PaymentLayer::builder()...nonce_store(nonces).prepaid(prepaid)
//! # let _ = prepaid;
//! # Ok(())
//! # }
//! ```
//!
//! ```
//! use std::time::Duration;
//! use tower_x402::{Network, PaymentLayer};
//! use tower_x402::prepaid::Bundle;
//! use tower_x402::primitives::address;
//! let layer = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .network(Network::BASE_SEPOLIA)
//!     .resource_base("https://api.example.com")
//!     .prepaid(Bundle::calls(200).within(Duration::from_secs(86_400)).for_price("$0.10"))
//!     .build()
//!     .unwrap();
//! ```
//!
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[`ProviderSignatures`]: https://docs.rs/tower-x402/latest/tower_x402/prepaid/wallets/struct.ProviderSignatures.html"
)]

pub mod ledger;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
pub mod siwx;
pub mod wallets;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresCreditLedger;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisCreditLedger;
pub use ledger::{CreditLedger, Debit, Grant, MemoryCreditLedger};
#[cfg(feature = "onchain")]
#[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
pub use wallets::ProviderSignatures;
pub use wallets::{ContractSignatureError, ContractSignatures};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use alloy_primitives::Address;
use http::HeaderMap;
use serde_json::{Map, Value};

use crate::Network;
use crate::alert::{Alert, alert};
use crate::clock::{Clock, SystemClock};
use crate::nonce::{NonceKey, NonceStore, Reservation, StoreError};
use crate::option::PaymentOption;

/// What one payment buys: a number of calls, a time window, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Bundle {
    calls: Option<u64>,
    window: Option<Duration>,
    price: Option<String>,
}

impl Bundle {
    /// `n` calls (the paying call included), with no time limit unless [`Self::within`].
    pub fn calls(n: u64) -> Self {
        Self {
            calls: Some(n),
            window: None,
            price: None,
        }
    }

    /// Unlimited calls for `window` from the payment.
    pub fn window(window: Duration) -> Self {
        Self {
            calls: None,
            window: Some(window),
            price: None,
        }
    }

    setters! {
        /// Limits the bundle's calls to `window` from the payment.
        pub fn within(window: Duration) => window = Some(window);

        /// The bundle's price, e.g. `"$0.10"`; replaces the layer's
        /// [`price`](crate::PaymentLayerBuilder::price) (default: that price).
        pub fn for_price(price: impl Into<String>) => price = Some(price.into());
    }

    /// What a payment at `now` adds to the ledger: the paying call is already taken.
    fn grant(&self, now: u64) -> Grant {
        Grant {
            calls: self.calls.map(|n| n.saturating_sub(1)),
            expires_at: self.window.map(|w| now.saturating_add(w.as_secs())),
        }
    }
}

/// Prepaid configuration: the bundle sold and how sign-ins are checked and counted.
#[must_use]
pub struct Prepaid {
    bundle: Bundle,
    ledger: Arc<dyn CreditLedger>,
    clock: Arc<dyn Clock>,
    nonce_key: Option<[u8; 32]>,
    ttl: Duration,
    statement: Option<String>,
    contracts: Option<Arc<dyn ContractSignatures>>,
}

impl std::fmt::Debug for Prepaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepaid")
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

impl From<Bundle> for Prepaid {
    fn from(bundle: Bundle) -> Self {
        Self::new(bundle)
    }
}

impl Prepaid {
    /// Sells `bundle`, with a fresh [`MemoryCreditLedger`], the system clock, a random nonce
    /// key and 5-minute sign-in messages.
    pub fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            ledger: Arc::new(MemoryCreditLedger::new()),
            clock: Arc::new(SystemClock),
            nonce_key: None,
            ttl: Duration::from_secs(300),
            statement: None,
            contracts: None,
        }
    }

    setters! {
        /// Replaces the ledger (default: a [`MemoryCreditLedger`] of this layer only).
        pub fn ledger(ledger: impl CreditLedger) => ledger = Arc::new(ledger);

        /// Replaces the clock of nonces, messages and credit expiry (default: system clock).
        pub fn clock(clock: impl Clock) => clock = Arc::new(clock);

        /// The key that authenticates nonces (default: random per layer). Instances behind one
        /// load balancer must share it, or a nonce issued by one is refused by the others.
        pub fn nonce_key(key: [u8; 32]) => nonce_key = Some(key);

        /// How long a challenge's sign-in message stays valid (default 5 minutes, whole seconds).
        pub fn message_ttl(ttl: Duration) => ttl = ttl;

        /// A human statement shown by wallets in the message (default none).
        pub fn statement(text: impl Into<String>) => statement = Some(text.into());
    }

    /// Lets smart wallets sign in: signatures that do not recover in-process to the claimed
    /// address (ERC-1271, ERC-6492) are checked by `checker`, which asks the chain (e.g.
    /// [`ProviderSignatures`] with the `onchain` feature). Default: none, EOA signatures only.
    ///
    /// Each such sign-in costs one chain call before the handler runs; a chain failure is
    /// answered 503 with `Retry-After` and leaves the message usable.
    ///
    #[cfg_attr(
        not(feature = "onchain"),
        doc = "[`ProviderSignatures`]: https://docs.rs/tower-x402/latest/tower_x402/prepaid/wallets/struct.ProviderSignatures.html"
    )]
    pub fn contract_signatures(mut self, checker: impl ContractSignatures) -> Self {
        self.contracts = Some(Arc::new(checker));
        self
    }

    /// The bundle price, if the bundle sets one.
    pub(crate) fn price(&self) -> Option<&str> {
        self.bundle.price.as_deref()
    }

    pub(crate) fn build(self, resource_base: Option<&str>) -> Result<State, BundleError> {
        let origin = siwx::Origin::parse(resource_base.ok_or(BundleError::NoOrigin)?)
            .ok_or(BundleError::BadOrigin)?;
        if self.bundle.calls == Some(0) {
            return Err(BundleError::ZeroCalls);
        }
        if self.bundle.window.is_some_and(|w| w.as_secs() == 0) || self.ttl.as_secs() == 0 {
            return Err(BundleError::ZeroWindow);
        }
        let key = match self.nonce_key {
            Some(key) => key,
            // A key of this process: another instance would refuse its sign-in nonces.
            None if self.ledger.is_shared() => return Err(BundleError::NonceKeyRequired),
            None => random_key(getrandom::fill)?,
        };
        Ok(State {
            bundle: self.bundle,
            ledger: self.ledger,
            clock: self.clock,
            nonces: siwx::Nonces::new(key, self.ttl.as_secs()),
            statement: self.statement,
            contracts: self.contracts,
            origin,
            schema: siwx::schema(),
            owed: Mutex::default(),
        })
    }
}

/// A fresh nonce key from `fill` (the OS generator). A failure is a build error: a key that
/// is not secret (all zeros) would let anyone forge sign-in nonces.
fn random_key(
    fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
) -> Result<[u8; 32], BundleError> {
    let mut key = [0u8; 32];
    fill(&mut key).map_err(|e| BundleError::NoRandomness(e.to_string()))?;
    Ok(key)
}

/// A prepaid configuration that cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// No `resource_base`: sign-in messages must be bound to the public origin.
    #[error("prepaid routes need resource_base(..): the public origin sign-ins are bound to")]
    NoOrigin,
    /// `resource_base` is not an `http(s)://host[:port][/path]` URL without credentials.
    #[error("resource_base is not an http(s) URL usable as a sign-in origin")]
    BadOrigin,
    /// A bundle of zero calls.
    #[error("a bundle must hold at least one call")]
    ZeroCalls,
    /// A window or message lifetime under one second.
    #[error("bundle window and message lifetime must be at least one second")]
    ZeroWindow,
    /// No [`Prepaid::nonce_key`] and the OS random source failed: a random key cannot be made.
    #[error("the OS random source failed ({0}): set Prepaid::nonce_key")]
    NoRandomness(String),
    /// A ledger shared between instances (Redis) but no [`Prepaid::nonce_key`]: each instance
    /// would make its own and refuse the others' sign-in nonces.
    #[error(
        "a shared credit ledger serves several instances: set Prepaid::nonce_key to the same 32 secret bytes on each"
    )]
    NonceKeyRequired,
}

/// A request served on prepaid credit, in the request extensions for the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignedIn {
    /// Who signed in (and paid for the bundle).
    pub payer: Address,
    /// Calls left after this one (`None`: a time window).
    pub remaining: Option<u64>,
}

/// `asset` of the [`NonceKey`]s of sign-in nonces: no token lives there, so they never meet
/// an EIP-3009 authorization's key.
const SIWX_NONCE_SPACE: Address = Address::new(*b"tower-x402/siwx\0\0\0\0\0");

/// A prepaid layer's per-request state (in `Shared`).
pub(crate) struct State {
    bundle: Bundle,
    ledger: Arc<dyn CreditLedger>,
    clock: Arc<dyn Clock>,
    nonces: siwx::Nonces,
    statement: Option<String>,
    contracts: Option<Arc<dyn ContractSignatures>>,
    origin: siwx::Origin,
    schema: Value,
    /// Credit the ledger failed to take (grants after a settled payment, refunds after a
    /// failed call), per payer: applied before the payer's next sign-in on this instance.
    owed: Mutex<HashMap<Address, Owed>>,
}

/// What the ledger owes one payer.
#[derive(Default)]
struct Owed {
    grants: Vec<Grant>,
    refunds: u32,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.refunds == 0
    }
}

/// Tries of a ledger write whose failure costs the payer (grant, refund): a blip is absorbed,
/// a ledger that stays down is not waited on.
const LEDGER_TRIES: u32 = 3;

/// Payers whose credit is kept in memory at most during a ledger outage.
const MAX_OWED: usize = 100_000;

/// `op`, tried up to [`LEDGER_TRIES`] times while its error is retryable.
///
/// A write that landed but reported an error (a timeout after the store applied it) is
/// repeated: the payer may get a call or a bundle twice. That is the seller's loss, bounded by
/// the outage, and preferred to the payer losing what they paid for.
async fn with_retries<F, Fut>(mut op: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut tries = 1;
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(e) if tries >= LEDGER_TRIES || !e.is_retryable() => return Err(e),
            Err(_) => tries += 1,
        }
    }
}

/// Why a sign-in was not served: the layer maps it to a response.
pub(crate) enum Refusal {
    /// 400 / 401 / 431.
    Siwx(siwx::SiwxError),
    /// 401: the nonce was used before.
    Replayed,
    /// 402: no credit.
    Exhausted,
    /// 402: credit expired.
    Expired,
    /// 503: nonce store or ledger down.
    Unavailable(StoreError),
    /// 503: the chain could not judge a contract signature.
    Chain(ContractSignatureError),
}

/// Reason codes of prepaid refusals (sign-in reasons are in [`siwx::reason`]).
pub mod reason {
    use crate::reason::Reason;

    /// A valid sign-in with no calls left: buy another bundle.
    pub const CREDIT_EXHAUSTED: Reason = Reason::PrepaidCreditExhausted;
    /// A valid sign-in whose credit expired: buy another bundle.
    pub const CREDIT_EXPIRED: Reason = Reason::PrepaidCreditExpired;
}

impl State {
    /// True if the ledger is shared between instances.
    pub(crate) fn is_shared(&self) -> bool {
        self.ledger.is_shared()
    }

    /// The v2 challenge's `extensions`: the layer's own plus a fresh `sign-in-with-x`.
    pub(crate) fn extensions(
        &self,
        base: Option<&Map<String, Value>>,
        url: &str,
        options: &[PaymentOption],
    ) -> Map<String, Value> {
        let mut map = base.cloned().unwrap_or_default();
        let decl = siwx::declaration(
            &self.nonces,
            &self.origin,
            self.statement.as_deref(),
            url,
            options.iter().map(|o| o.requirements().network),
            self.clock.now(),
            &self.schema,
        );
        map.insert(siwx::EXTENSION.to_owned(), decl);
        map
    }

    /// Checks the `SIGN-IN-WITH-X` proof, spends its nonce and takes one call.
    pub(crate) async fn sign_in(
        &self,
        store: &dyn NonceStore,
        headers: &HeaderMap,
        options: &[PaymentOption],
        max_header_bytes: usize,
    ) -> Result<SignedIn, Refusal> {
        let payload = match siwx::decode(headers, max_header_bytes) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Refusal::Exhausted),
            Err(e) => return Err(Refusal::Siwx(e)),
        };
        let chains: Vec<Network> = options.iter().map(|o| o.requirements().network).collect();
        let now = self.clock.now();
        let checked = siwx::check(
            &payload,
            &self.nonces,
            &self.origin,
            &chains,
            now,
            self.contracts.is_some(),
        )
        .map_err(Refusal::Siwx)?;
        let (signed, contract) = match checked {
            siwx::Checked::Signed(signed) => (signed, None),
            siwx::Checked::Contract {
                sign_in,
                hash,
                signature,
            } => (sign_in, Some((hash, signature))),
        };
        // A valid signature by this payer: first hand over credit the ledger still owes them,
        // so a refusal below never says "exhausted" about credit that was paid for. If the
        // ledger is still down, 503 (the nonce is not spent yet).
        if let Err(e) = self.pay_owed(signed.address, now).await {
            return Err(Refusal::Unavailable(e));
        }
        let key = NonceKey {
            chain_id: signed.chain_id,
            asset: SIWX_NONCE_SPACE,
            from: signed.address,
            nonce: signed.nonce,
        };
        // Reserved before any chain call, so a replayed message never reaches the chain.
        let token = match store.reserve(&key, signed.expires_at).await {
            Ok(Reservation::Reserved(token)) => token,
            Ok(Reservation::InUse | Reservation::Used) => return Err(Refusal::Replayed),
            Err(e) => return Err(Refusal::Unavailable(e)),
        };
        if let Some((hash, signature)) = contract {
            let answer = match &self.contracts {
                Some(checker) => {
                    checker
                        .is_valid(signed.chain_id, signed.address, hash, &signature)
                        .await
                }
                // Never reached (`check` hands a signature back only with a checker): closed.
                None => Ok(false),
            };
            if !matches!(answer, Ok(true)) {
                // Not a valid message (or no answer): the nonce was not spent by it, so a
                // chain outage does not burn the client's sign-in. A failed release leaves it
                // reserved until it expires: the client signs a fresh challenge.
                if let Err(e) = store.release(&key, token).await {
                    alert!(
                        Alert::NonceRelease,
                        cause = &e,
                        "nonce store could not give a sign-in nonce back (blocked until it expires)"
                    );
                }
                return Err(match answer {
                    Err(e) if e.is_unavailable() => Refusal::Chain(e),
                    _ => Refusal::Siwx(siwx::SiwxError::ContractSignature {
                        claimed: signed.address,
                    }),
                });
            }
        }
        let debit = match self.ledger.debit(signed.address, now).await {
            Ok(debit) => debit,
            Err(e) => {
                // Nothing was taken: the message may come back once the ledger answers (503
                // with Retry-After, the same header works then).
                if let Err(e) = store.release(&key, token).await {
                    alert!(
                        Alert::NonceRelease,
                        cause = &e,
                        "nonce store could not give a sign-in nonce back (blocked until it expires)"
                    );
                }
                return Err(Refusal::Unavailable(e));
            }
        };
        // Spent for good, whatever follows: a signed message buys at most one attempt. A
        // failed consume leaves it reserved until it expires: still one use, so the call goes
        // on and the failure is only raised.
        if let Err(e) = store.consume(&key, token).await {
            alert!(
                Alert::NonceConsume,
                cause = &e,
                "nonce store could not mark a sign-in nonce used (it stays reserved until it expires)"
            );
        }
        match debit {
            Debit::Debited { remaining } => Ok(SignedIn {
                payer: signed.address,
                remaining,
            }),
            Debit::Exhausted => Err(Refusal::Exhausted),
            Debit::Expired => Err(Refusal::Expired),
        }
    }

    /// The handler did not serve the call: give it back. The ledger is tried
    /// [`LEDGER_TRIES`] times; if it still fails, the refund is kept in memory and applied
    /// before the payer's next sign-in here, and [`Alert::CreditRefund`] is raised.
    pub(crate) async fn refund(&self, payer: Address) {
        if let Err(e) = with_retries(|| self.ledger.refund(payer)).await {
            let kept = self.owe(payer, |o| o.refunds = o.refunds.saturating_add(1));
            alert!(
                Alert::CreditRefund,
                cause = &e,
                "prepaid call of {payer} failed and its credit could not be refunded; {}",
                if kept {
                    "kept in memory, refunded at the payer's next sign-in on this instance (lost on restart)"
                } else {
                    "too much credit owed already: refund it by hand"
                }
            );
        }
    }

    /// A bundle was paid for and settled: credit the payer (the paying call is served).
    ///
    /// The money moved, so the paying call is served with its receipt whatever happens here.
    /// The ledger is tried [`LEDGER_TRIES`] times; if it still fails, the grant is kept in
    /// memory and applied before the payer's next sign-in on this instance (which answers 503
    /// while the ledger stays down, never "exhausted"), and [`Alert::CreditGrant`] is raised
    /// at error level: across a restart, or at another instance, the seller must credit it by
    /// hand. True when the credit is in the ledger.
    pub(crate) async fn granted(&self, payer: Address) -> bool {
        let now = self.clock.now();
        let grant = self.bundle.grant(now);
        let Err(e) = with_retries(|| self.ledger.grant(payer, grant, now)).await else {
            return true;
        };
        let kept = self.owe(payer, |o| o.grants.push(grant));
        alert!(
            Alert::CreditGrant,
            cause = &e,
            "prepaid bundle paid by {payer} (calls {:?}, expiry {:?}) could not be credited; {}",
            grant.calls,
            grant.expires_at,
            if kept {
                "kept in memory, credited at the payer's next sign-in on this instance (lost on restart)"
            } else {
                "too much credit owed already: credit it by hand"
            }
        );
        false
    }

    fn owed(&self) -> MutexGuard<'_, HashMap<Address, Owed>> {
        // The map is consistent after any panic (each change is one call): keep using it.
        self.owed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records credit owed to `payer`; false when the map is full.
    fn owe(&self, payer: Address, add: impl FnOnce(&mut Owed)) -> bool {
        let mut owed = self.owed();
        if owed.len() >= MAX_OWED && !owed.contains_key(&payer) {
            return false;
        }
        add(owed.entry(payer).or_default());
        true
    }

    /// Applies what the ledger owes `payer`; what it cannot apply stays owed.
    async fn pay_owed(&self, payer: Address, now: u64) -> Result<(), StoreError> {
        let Some(mut owed) = self.owed().remove(&payer) else {
            return Ok(());
        };
        let mut result = Ok(());
        while let Some(grant) = owed.grants.first().copied() {
            if let Err(e) = self.ledger.grant(payer, grant, now).await {
                result = Err(e);
                break;
            }
            owed.grants.remove(0);
        }
        while result.is_ok() && owed.refunds > 0 {
            match self.ledger.refund(payer).await {
                Ok(()) => owed.refunds -= 1,
                Err(e) => result = Err(e),
            }
        }
        if !owed.is_empty() {
            let mut map = self.owed();
            let entry = map.entry(payer).or_default();
            owed.grants.append(&mut entry.grants);
            entry.grants = owed.grants;
            entry.refunds = entry.refunds.saturating_add(owed.refunds);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_random_source_fails_the_build_instead_of_a_zero_key() {
        let failed = random_key(|_| Err(getrandom::Error::UNSUPPORTED));
        assert!(matches!(failed, Err(BundleError::NoRandomness(_))));
        let key = random_key(getrandom::fill).expect("the OS source works here");
        assert_ne!(key, [0u8; 32]);
        // Through the public builder path: a set key needs no randomness.
        let state = Prepaid::new(Bundle::calls(2))
            .nonce_key([7; 32])
            .build(Some("https://api.example.com"));
        assert!(state.is_ok());
    }
}
