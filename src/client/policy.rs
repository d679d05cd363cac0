//! What the client is willing to pay: networks, assets, a cap per request and a total budget.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::{Address, U256};

use crate::proto::v2::PaymentRequirements;
use crate::verify::exact::SCHEME;
use crate::{Asset, Network};

/// The client's spending rules, checked on every 402 challenge **before** anything is signed.
///
/// Amounts are atomic units of the token (USDC has 6 decimals: `10_000` is $0.01). A cap is
/// only meaningful per token, so restrict the assets with [`Policy::allow_asset`] when a
/// server may offer several.
///
/// ```
/// use tower_x402::client::{Budget, Policy};
/// use tower_x402::primitives::U256;
/// use tower_x402::Asset;
///
/// let policy = Policy::new(U256::from(10_000))          // at most $0.01 per request
///     .allow_asset(&Asset::usdc_base_sepolia())          // only Base Sepolia USDC
///     .budget(Budget::new(U256::from(1_000_000)));       // $1 in total, shared by clones
/// # let _ = policy;
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    networks: Vec<Network>,
    assets: Vec<(Network, Address)>,
    max_per_request: U256,
    budget: Option<Budget>,
}

impl Policy {
    /// Pays at most `max_per_request` atomic units per request, on any network and in any
    /// token, with no total budget. Narrow it with the other methods.
    pub fn new(max_per_request: U256) -> Self {
        Self {
            networks: Vec::new(),
            assets: Vec::new(),
            max_per_request,
            budget: None,
        }
    }

    /// Allows `network` (may be called several times). Default: every network.
    #[must_use]
    pub fn allow_network(mut self, network: Network) -> Self {
        self.networks.push(network);
        self
    }

    /// Allows the token `asset` (its network and contract; may be called several times).
    /// Default: every token.
    #[must_use]
    pub fn allow_asset(mut self, asset: &Asset) -> Self {
        self.assets.push((asset.network, asset.address));
        self
    }

    /// Allows the token at `address` on `network`.
    #[must_use]
    pub fn allow_token(mut self, network: Network, address: Address) -> Self {
        self.assets.push((network, address));
        self
    }

    /// Caps the total signed across every request of this layer and its clones (and of any
    /// other layer given a clone of the same [`Budget`]). Default: no total cap.
    #[must_use]
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The cap per request.
    pub fn max_per_request(&self) -> U256 {
        self.max_per_request
    }

    /// The shared budget, if one is set.
    pub fn shared_budget(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }

    /// Why `req` may not be paid, or `None` if it may (budget aside).
    pub(crate) fn refusal(&self, req: &PaymentRequirements) -> Option<Refusal> {
        if req.scheme != SCHEME {
            return Some(Refusal::Scheme);
        }
        if !self.networks.is_empty() && !self.networks.contains(&req.network) {
            return Some(Refusal::Network);
        }
        if !self.assets.is_empty() && !self.assets.contains(&(req.network, req.asset)) {
            return Some(Refusal::Asset);
        }
        if req.amount.is_zero() {
            return Some(Refusal::ZeroAmount);
        }
        if req.amount > self.max_per_request {
            return Some(Refusal::OverCap);
        }
        // Only EIP-3009 is signed here; Permit2 needs another payload.
        let method = req.extra_str("assetTransferMethod").unwrap_or("eip3009");
        if method != "eip3009" {
            return Some(Refusal::TransferMethod);
        }
        if req.extra_str("name").is_none() || req.extra_str("version").is_none() {
            return Some(Refusal::MissingDomain);
        }
        None
    }
}

/// Why an offered payment option was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Not the `exact` scheme.
    Scheme,
    /// A network the policy does not allow (or one this crate cannot sign for).
    Network,
    /// A token the policy does not allow.
    Asset,
    /// An amount of zero: nothing to sign.
    ZeroAmount,
    /// More than the cap per request.
    OverCap,
    /// Not an EIP-3009 transfer (Permit2 is not supported).
    TransferMethod,
    /// `extra` lacks the EIP-712 `name`/`version`: the signature could not verify.
    MissingDomain,
    /// The entry is not a valid x402 requirement.
    Malformed,
    /// The payer's balance is below the amount.
    InsufficientBalance,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scheme => "scheme is not exact",
            Self::Network => "network not allowed",
            Self::Asset => "asset not allowed",
            Self::ZeroAmount => "zero amount",
            Self::OverCap => "amount over the per-request cap",
            Self::TransferMethod => "transfer method is not EIP-3009",
            Self::MissingDomain => "no EIP-712 name/version in extra",
            Self::Malformed => "malformed requirement",
            Self::InsufficientBalance => "balance too low",
        })
    }
}

/// A total spending cap with a running tally, shared by every clone.
///
/// The tally counts every authorization the client **signs**, whether or not the server
/// settled it: a signed EIP-3009 authorization can be settled by whoever holds it until it
/// expires, so this is the most the signer can lose. Retries reuse the signed proof and are
/// not counted twice.
#[derive(Clone)]
pub struct Budget(Arc<Mutex<Tally>>);

#[derive(Debug)]
struct Tally {
    limit: U256,
    spent: U256,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.lock();
        f.debug_struct("Budget")
            .field("limit", &t.limit)
            .field("spent", &t.spent)
            .finish()
    }
}

impl Budget {
    /// A budget of `limit` atomic units, nothing spent yet.
    pub fn new(limit: U256) -> Self {
        Self(Arc::new(Mutex::new(Tally {
            limit,
            spent: U256::ZERO,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        // The tally is two numbers updated together; a panic elsewhere cannot leave it torn.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The total cap.
    pub fn limit(&self) -> U256 {
        self.lock().limit
    }

    /// What was signed so far.
    pub fn spent(&self) -> U256 {
        self.lock().spent
    }

    /// What may still be signed.
    pub fn remaining(&self) -> U256 {
        let t = self.lock();
        t.limit.saturating_sub(t.spent)
    }

    /// Counts `amount` if it fits, atomically; otherwise returns what remains.
    pub(crate) fn try_spend(&self, amount: U256) -> Result<(), U256> {
        let mut t = self.lock();
        let remaining = t.limit.saturating_sub(t.spent);
        if amount > remaining {
            return Err(remaining);
        }
        t.spent += amount;
        Ok(())
    }

    /// Gives back an amount counted by [`Budget::try_spend`] that was never signed.
    pub(crate) fn refund(&self, amount: U256) {
        let mut t = self.lock();
        t.spent = t.spent.saturating_sub(amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_refuses_overdraft() {
        let b = Budget::new(U256::from(25));
        let c = b.clone();
        assert!(b.try_spend(U256::from(10)).is_ok());
        assert!(c.try_spend(U256::from(10)).is_ok());
        assert_eq!(b.try_spend(U256::from(10)), Err(U256::from(5)));
        assert_eq!(c.spent(), U256::from(20));
        assert_eq!(b.remaining(), U256::from(5));
    }

    #[test]
    fn refusals() {
        let asset = Asset::usdc_base_sepolia();
        let mut req = crate::PaymentOption::exact(&asset, "$0.01", Address::repeat_byte(1))
            .unwrap()
            .requirements()
            .clone();
        let p = Policy::new(U256::from(10_000)).allow_asset(&asset);
        assert_eq!(p.refusal(&req), None);
        assert_eq!(
            Policy::new(U256::from(9_999)).refusal(&req),
            Some(Refusal::OverCap)
        );
        assert_eq!(
            Policy::new(U256::MAX)
                .allow_network(Network::BASE)
                .refusal(&req),
            Some(Refusal::Network)
        );
        assert_eq!(
            Policy::new(U256::MAX)
                .allow_asset(&Asset::usdc_base())
                .refusal(&req),
            Some(Refusal::Asset)
        );
        req.extra = None;
        assert_eq!(p.refusal(&req), Some(Refusal::MissingDomain));
        req.scheme = "upto".into();
        assert_eq!(p.refusal(&req), Some(Refusal::Scheme));
    }
}
