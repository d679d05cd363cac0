//! Metered billing with the x402 `upto` scheme: the client authorises a maximum, the handler
//! reports what the call used, and the layer settles that amount once (or nothing).
//!
//! A route that accepts [`PaymentOption::upto`](crate::PaymentOption::upto) gets, for each
//! verified `upto` payment, a [`Usage`] meter in the request extensions. The handler charges
//! it as it works (tokens generated, bytes served, ...). When the handler's response is ready
//! (status below 400), the layer reads the meter:
//!
//! | metered total | what happens |
//! |---|---|
//! | `0` | nothing is sent on-chain; success receipt with `amount: "0"` and no transaction |
//! | `1 ..= max` | one settlement of exactly that amount; the receipt's `amount` says it |
//! | a charge went above `max` | nothing is settled, the body is withheld: 402 `invalid_upto_evm_payload_settlement_exceeds_amount` |
//!
//! Usage is read when the response *headers* are ready: charge before returning the
//! response, not while its body streams. `upto` payments always settle after the handler,
//! whatever the [`SettlementMode`](crate::settle::SettlementMode) (a layer with only static
//! `upto` options refuses `BeforeHandler` at build time). A handler error (status ≥ 400)
//! settles nothing and releases the proof, as for `exact`.
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_x402::upto::Usage;
//!
//! // $0.000010 per generated token, up to the signed maximum.
//! async fn generate(usage: Usage) -> String {
//!     let mut out = String::new();
//!     for word in ["metered", "billing", "works"] {
//!         if usage.charge_atomic(10).is_err() {
//!             break; // the client's maximum is reached: stop here
//!         }
//!         out.push_str(word);
//!         out.push(' ');
//!     }
//!     out
//! }
//! let app: Router = Router::new().route("/generate", post(generate));
//! ```
//!
//! The verification checks are in [`crate::verify::upto`]; the on-chain settlement (through
//! the x402 upto Permit2 proxy, from the account named in the option) in
//! [`OnchainSettler`][crate::settle::onchain::OnchainSettler].
//!
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[crate::settle::onchain::OnchainSettler]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html"
)]

use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::U256;

/// Reason code when the metered usage went above the signed maximum.
pub use crate::verify::upto::reason::SETTLEMENT_EXCEEDS_AMOUNT;

/// The usage meter of one `upto` payment; cheap to clone (clones share the count).
///
/// The layer puts one into the request extensions of every verified `upto` payment and
/// settles [`Self::total`] after the handler. A charge that would take the total above the
/// signed maximum is refused and marks the meter overrun: the layer then settles nothing and
/// withholds the response.
#[derive(Clone, Debug)]
pub struct Usage {
    max: U256,
    state: Arc<Mutex<Meter>>,
}

#[derive(Debug, Default)]
struct Meter {
    total: U256,
    overrun: bool,
}

/// A charge above the payment's maximum (nothing was added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("usage {wanted} above the authorised maximum {max}")]
pub struct UsageExceeded {
    /// The total the charge would have reached.
    pub wanted: U256,
    /// The signed maximum.
    pub max: U256,
}

impl Usage {
    /// A meter for a payment authorising at most `max` atomic units.
    pub fn new(max: U256) -> Self {
        Self {
            max,
            state: Arc::default(),
        }
    }

    fn meter(&self) -> std::sync::MutexGuard<'_, Meter> {
        // The meter's invariants hold between statements: a panic elsewhere cannot break them.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The signed maximum, in atomic units.
    pub fn max(&self) -> U256 {
        self.max
    }

    /// What has been charged so far.
    pub fn total(&self) -> U256 {
        self.meter().total
    }

    /// What may still be charged.
    pub fn remaining(&self) -> U256 {
        self.max.saturating_sub(self.total())
    }

    /// True once a charge went above the maximum: the payment will not settle.
    pub fn is_overrun(&self) -> bool {
        self.meter().overrun
    }

    /// Adds `amount` atomic units, returning the new total.
    ///
    /// # Errors
    /// [`UsageExceeded`] when the total would pass the maximum: nothing is added, and the
    /// meter is overrun (the layer will settle nothing and withhold the response).
    pub fn charge(&self, amount: U256) -> Result<U256, UsageExceeded> {
        let mut m = self.meter();
        match m.total.checked_add(amount).filter(|t| *t <= self.max) {
            Some(total) => {
                m.total = total;
                Ok(total)
            }
            None => {
                m.overrun = true;
                Err(UsageExceeded {
                    wanted: m.total.saturating_add(amount),
                    max: self.max,
                })
            }
        }
    }

    /// [`Self::charge`] with a `u64`.
    ///
    /// # Errors
    /// As [`Self::charge`].
    pub fn charge_atomic(&self, amount: u64) -> Result<U256, UsageExceeded> {
        self.charge(U256::from(amount))
    }

    /// The settlement decision: `Ok(total)` or the overrun.
    pub(crate) fn settle_amount(&self) -> Result<U256, UsageExceeded> {
        let m = self.meter();
        if m.overrun {
            Err(UsageExceeded {
                wanted: m.total,
                max: self.max,
            })
        } else {
            Ok(m.total)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_to_the_maximum_and_no_further() {
        let usage = Usage::new(U256::from(100));
        assert_eq!(usage.charge_atomic(60), Ok(U256::from(60)));
        assert_eq!(usage.clone().charge_atomic(40), Ok(U256::from(100)));
        assert_eq!(usage.remaining(), U256::ZERO);
        assert!(!usage.is_overrun());
        assert_eq!(usage.settle_amount(), Ok(U256::from(100)));
        let err = usage.charge_atomic(1).unwrap_err();
        assert_eq!((err.wanted, err.max), (U256::from(101), U256::from(100)));
        assert_eq!(
            usage.total(),
            U256::from(100),
            "a refused charge adds nothing"
        );
        assert!(usage.is_overrun());
        assert!(usage.settle_amount().is_err());
    }

    #[test]
    fn a_charge_that_overflows_is_an_overrun() {
        let usage = Usage::new(U256::MAX);
        usage.charge(U256::MAX).unwrap();
        assert!(usage.charge_atomic(1).is_err());
        assert!(usage.is_overrun());
    }
}
