//! What the client is willing to pay: networks, assets, a cap per request and a total budget.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::{Address, U256};

use crate::proto::svm::Pubkey;
use crate::proto::v2::PaymentRequirements;
use crate::proto::{Account, X402Version};
use crate::verify::{exact, upto};
use crate::{Asset, Network};

/// The client's spending rules, checked on every 402 challenge **before** anything is signed.
///
/// Amounts are atomic units of the token (USDC has 6 decimals: `10_000` is $0.01). A cap is
/// only meaningful per token, so restrict the assets with [`Policy::allow_asset`] when a
/// server may offer several.
///
/// By default only the `exact` scheme is paid; [`Policy::allow_upto`] adds metered `upto`
/// offers, whose maximum is what the cap, the budget and the "cheapest first" order look at.
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
    assets: Vec<(Network, Account)>,
    max_per_request: U256,
    budget: Option<Budget>,
    upto: bool,
    /// `batch-settlement` offers are paid (the layer was given a `ChannelPolicy`).
    pub(crate) channels: bool,
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
            upto: false,
            channels: false,
        }
    }

    /// Also pays metered `upto` offers (x402 `scheme_upto_evm`): the client signs a Permit2
    /// permit for the offer's **maximum**, and the server settles what the call used, at most
    /// that. Default: off, only `exact` is paid.
    ///
    /// Off by default because Permit2 pulls the tokens: the payer must first approve the
    /// Permit2 contract (`0x000000000022D473030F116dDEE9F6B43aC78BA3`) for the token, once,
    /// in an on-chain transaction of its own (servers refuse the permit with 402
    /// `permit2_allowance_required` until then). That standing approval is a choice the
    /// payer makes, not one this client makes for it.
    ///
    /// An `upto` offer is eligible when its maximum (the requirement's `amount`) is within
    /// [`Policy::max_per_request`], its network and token are allowed, and its
    /// `extra.facilitatorAddress` (the only account that may settle the permit) is an
    /// address. Offers are tried cheapest first, comparing `exact` prices with `upto` maxima
    /// (on a tie, the server's order). The [`Budget`] counts the maximum when signing and
    /// gets back what the server's receipt says it did not settle. `upto` is x402 v2 only.
    #[must_use]
    pub fn allow_upto(mut self) -> Self {
        self.upto = true;
        self
    }

    /// True when `upto` offers are paid ([`Policy::allow_upto`]).
    pub fn upto_allowed(&self) -> bool {
        self.upto
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
        self.assets
            .push((asset.network, Account::Evm(asset.address)));
        self
    }

    /// Allows the token at `address` on `network`.
    #[must_use]
    pub fn allow_token(mut self, network: Network, address: Address) -> Self {
        self.assets.push((network, Account::Evm(address)));
        self
    }

    /// Allows the Solana token `mint` on `network` (may be called several times, with the
    /// EVM tokens). Solana offers are paid only by a layer given a payer
    /// ([`PayingLayer::svm`](super::PayingLayer)).
    #[must_use]
    pub fn allow_svm_token(mut self, network: Network, mint: Pubkey) -> Self {
        self.assets.push((network, Account::Svm(mint)));
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

    /// Why `req`, offered in a `version` challenge, may not be paid, or `None` if it may
    /// (budget and balance aside).
    ///
    /// `svm` names the Solana payer's key when the layer has one ([`PayingLayer::svm`]):
    /// without it Solana offers are refused ([`Refusal::Network`]).
    ///
    /// [`PayingLayer::svm`]: super::PayingLayer
    pub(crate) fn refusal(
        &self,
        version: X402Version,
        req: &PaymentRequirements,
        svm: Option<Pubkey>,
    ) -> Option<Refusal> {
        let is_upto = req.scheme == upto::SCHEME;
        let is_channel = req.scheme == crate::channel::SCHEME;
        if is_channel {
            // Channels are v2 and EVM only, and paid only by a layer given a `ChannelPolicy`.
            if !self.channels || version != X402Version::V2 {
                return Some(Refusal::Scheme);
            }
        } else if is_upto {
            if !self.upto {
                return Some(Refusal::UptoNotAllowed);
            }
            // `upto` is a v2 scheme: there is no v1 payload for it.
            if version != X402Version::V2 {
                return Some(Refusal::Scheme);
            }
        } else if req.scheme != exact::SCHEME {
            return Some(Refusal::Scheme);
        }
        // A Solana offer needs a Solana payer (and is `exact` only).
        let solana = req.network.is_solana();
        if (solana && (svm.is_none() || is_upto || is_channel))
            || (!self.networks.is_empty() && !self.networks.contains(&req.network))
        {
            return Some(Refusal::Network);
        }
        let listed = |a: &(Network, Account)| a.0 == req.network && req.asset == a.1;
        if !self.assets.is_empty() && !self.assets.iter().any(listed) {
            return Some(Refusal::Asset);
        }
        if req.amount.is_zero() {
            return Some(Refusal::ZeroAmount);
        }
        // For `upto`, `amount` is the maximum: the most the signature can ever cost.
        if req.amount > self.max_per_request {
            return Some(Refusal::OverCap);
        }
        if solana {
            // The server's key pays the fees; it must be a key, and never the payer's own
            // (the payer would then sign as fee payer and could be drained).
            return match super::svm_fee_payer(req) {
                Some(k) if Some(k) != svm => None,
                _ => Some(Refusal::FeePayer),
            };
        }
        if is_channel
            && (super::channel::receiver_authorizer(req).is_none()
                || super::channel::withdraw_delay(req).is_none())
        {
            return Some(Refusal::ChannelTerms);
        }
        if is_upto {
            // The permit names the one account allowed to settle it: without it, no permit.
            return facilitator(req).is_none().then_some(Refusal::Facilitator);
        }
        // Only EIP-3009 is signed for `exact`; its Permit2 variant needs another payload.
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

/// The `extra.facilitatorAddress` of an `upto` requirement, if it is a non-zero address.
pub(crate) fn facilitator(req: &PaymentRequirements) -> Option<Address> {
    req.extra_str(upto::FACILITATOR_ADDRESS)?
        .parse::<Address>()
        .ok()
        .filter(|a| !a.is_zero())
}

/// Why an offered payment option was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A scheme this client does not pay (neither `exact` nor `upto`, or `upto` in a v1
    /// challenge; `batch-settlement` without `PayingLayer::channels`).
    Scheme,
    /// An `upto` offer, and the policy does not allow them ([`Policy::allow_upto`]).
    UptoNotAllowed,
    /// A network the policy does not allow (or one this crate cannot sign for).
    Network,
    /// A token the policy does not allow.
    Asset,
    /// An amount of zero: nothing to sign.
    ZeroAmount,
    /// More than the cap per request (for `upto`, the maximum is).
    OverCap,
    /// An `upto` offer without an `extra.facilitatorAddress` that is an address.
    Facilitator,
    /// A Solana offer whose `extra.feePayer` is not a key, or is the payer's own.
    FeePayer,
    /// A `batch-settlement` offer without a non-zero `extra.receiverAuthorizer` or with an
    /// `extra.withdrawDelay` outside 15 minutes to 30 days.
    ChannelTerms,
    /// Not an EIP-3009 transfer (Permit2 is not supported).
    TransferMethod,
    /// `extra` lacks the EIP-712 `name`/`version`: the signature could not verify.
    MissingDomain,
    /// The entry is not a valid x402 requirement.
    Malformed,
    /// The payer's balance is below the amount (for `upto`, the maximum).
    InsufficientBalance,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scheme => "scheme not supported",
            Self::UptoNotAllowed => "upto not allowed by the policy",
            Self::Network => "network not allowed",
            Self::Asset => "asset not allowed",
            Self::ZeroAmount => "zero amount",
            Self::OverCap => "amount over the per-request cap",
            Self::Facilitator => "no valid extra.facilitatorAddress for upto",
            Self::FeePayer => "no valid extra.feePayer for Solana",
            Self::ChannelTerms => "no valid batch-settlement receiverAuthorizer/withdrawDelay",
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
///
/// An `upto` permit is counted at its maximum when signed; when the paid answer carries a
/// successful receipt with the settled `amount`, the difference is given back, so the tally
/// ends at what was settled. Without such a receipt (refused, no receipt, outcome unknown)
/// the maximum stays counted: the permit can still be settled up to it until its deadline.
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

    /// Gives back an amount counted by [`Budget::try_spend`] that was never signed (or, for
    /// `upto`, the part of the maximum that was not settled).
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
        assert_eq!(p.refusal(V2, &req, None), None);
        assert_eq!(p.refusal(V1, &req, None), None);
        assert_eq!(
            Policy::new(U256::from(9_999)).refusal(V2, &req, None),
            Some(Refusal::OverCap)
        );
        assert_eq!(
            Policy::new(U256::MAX)
                .allow_network(Network::BASE)
                .refusal(V2, &req, None),
            Some(Refusal::Network)
        );
        assert_eq!(
            Policy::new(U256::MAX)
                .allow_asset(&Asset::usdc_base())
                .refusal(V2, &req, None),
            Some(Refusal::Asset)
        );
        req.extra = None;
        assert_eq!(p.refusal(V2, &req, None), Some(Refusal::MissingDomain));
        req.scheme = "deferred".into();
        assert_eq!(p.refusal(V2, &req, None), Some(Refusal::Scheme));
    }

    const V1: X402Version = X402Version::V1;
    const V2: X402Version = X402Version::V2;

    fn upto_req(max: u64) -> PaymentRequirements {
        crate::PaymentOption::upto_atomic(
            &Asset::usdc_base_sepolia(),
            U256::from(max),
            Address::repeat_byte(1),
            Address::repeat_byte(0xfa),
        )
        .unwrap()
        .requirements()
        .clone()
    }

    #[test]
    fn upto_is_off_by_default() {
        let req = upto_req(50_000);
        let p = Policy::new(U256::MAX);
        assert!(!p.upto_allowed());
        assert_eq!(p.refusal(V2, &req, None), Some(Refusal::UptoNotAllowed));
        let p = p.allow_upto();
        assert!(p.upto_allowed());
        assert_eq!(p.refusal(V2, &req, None), None);
        // No v1 payload exists for upto.
        assert_eq!(p.refusal(V1, &req, None), Some(Refusal::Scheme));
    }

    #[test]
    fn upto_is_capped_on_its_maximum_and_follows_networks_and_tokens() {
        let asset = Asset::usdc_base_sepolia();
        let req = upto_req(50_000);
        let capped = |cap: u64| Policy::new(U256::from(cap)).allow_upto();
        assert_eq!(capped(50_000).refusal(V2, &req, None), None);
        assert_eq!(
            capped(49_999).refusal(V2, &req, None),
            Some(Refusal::OverCap)
        );
        assert_eq!(
            capped(50_000).allow_asset(&asset).refusal(V2, &req, None),
            None
        );
        assert_eq!(
            capped(50_000)
                .allow_asset(&Asset::usdc_base())
                .refusal(V2, &req, None),
            Some(Refusal::Asset)
        );
        assert_eq!(
            capped(50_000)
                .allow_network(Network::BASE)
                .refusal(V2, &req, None),
            Some(Refusal::Network)
        );
        let mut zero = req.clone();
        zero.amount = U256::ZERO;
        assert_eq!(
            capped(50_000).refusal(V2, &zero, None),
            Some(Refusal::ZeroAmount)
        );
        // The EIP-3009 domain and transfer method do not matter to a Permit2 permit.
        let mut bare = req.clone();
        let extra = bare.extra.as_mut().unwrap();
        extra.remove("name");
        extra.remove("version");
        extra.insert("assetTransferMethod".into(), "permit2".into());
        assert_eq!(capped(50_000).refusal(V2, &bare, None), None);
    }

    #[cfg(feature = "svm")]
    #[test]
    fn solana_offers_need_a_payer_a_fee_payer_that_is_not_it_and_an_allowed_mint() {
        use crate::proto::svm::Pubkey;
        use crate::svm::{SvmAsset, program};
        let (fee_payer, pay_to, me) = (
            Pubkey::new([1; 32]),
            Pubkey::new([2; 32]),
            Pubkey::new([3; 32]),
        );
        let asset = SvmAsset::usdc_devnet();
        let req = |fee_payer| {
            crate::PaymentOption::exact_svm(&asset, "$0.001", pay_to, fee_payer)
                .unwrap()
                .requirements()
                .clone()
        };
        let p = Policy::new(U256::from(1000));
        assert_eq!(p.refusal(V2, &req(fee_payer), None), Some(Refusal::Network));
        assert_eq!(p.refusal(V2, &req(fee_payer), Some(me)), None);
        // The payer must never sign as the fee payer.
        assert_eq!(p.refusal(V2, &req(me), Some(me)), Some(Refusal::FeePayer));
        let mut bad = req(fee_payer);
        bad.extra
            .as_mut()
            .unwrap()
            .insert("feePayer".into(), "0xnope".into());
        assert_eq!(p.refusal(V2, &bad, Some(me)), Some(Refusal::FeePayer));
        let evm_only = p.clone().allow_asset(&Asset::usdc_base_sepolia());
        assert_eq!(
            evm_only.refusal(V2, &req(fee_payer), Some(me)),
            Some(Refusal::Asset)
        );
        let both = evm_only.allow_svm_token(asset.network, program::USDC_DEVNET);
        assert_eq!(both.refusal(V2, &req(fee_payer), Some(me)), None);
        assert_eq!(
            Policy::new(U256::from(999)).refusal(V2, &req(fee_payer), Some(me)),
            Some(Refusal::OverCap)
        );
    }

    #[test]
    fn upto_without_a_usable_facilitator_address_is_refused() {
        let p = Policy::new(U256::MAX).allow_upto();
        let with = |value: Option<serde_json::Value>| {
            let mut req = upto_req(50_000);
            let extra = req.extra.as_mut().unwrap();
            match value {
                Some(v) => extra.insert(upto::FACILITATOR_ADDRESS.into(), v),
                None => extra.remove(upto::FACILITATOR_ADDRESS),
            };
            p.refusal(V2, &req, None)
        };
        assert_eq!(with(None), Some(Refusal::Facilitator));
        for garbage in [
            "".into(),
            "0xnot-an-address".into(),
            "0x1234".into(),
            format!("{}", Address::ZERO).into(),
            serde_json::json!(42),
            serde_json::json!({"address": "0xfa"}),
        ] {
            assert_eq!(
                with(Some(garbage.clone())),
                Some(Refusal::Facilitator),
                "{garbage}"
            );
        }
        let lower = alloy_primitives::hex::encode_prefixed(Address::repeat_byte(0xfa));
        assert_eq!(with(Some(lower.into())), None, "any address form parses");
        let mut no_extra = upto_req(50_000);
        no_extra.extra = None;
        assert_eq!(p.refusal(V2, &no_extra, None), Some(Refusal::Facilitator));
    }
}
