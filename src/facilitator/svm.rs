//! Solana `exact` payments through a facilitator (issue #20 item 4).
//!
//! The facilitator co-signs the client's transaction as fee payer, simulates, sends and
//! confirms it (`@x402/svm` 2.27); the fee payer is its key, advertised as `extra.feePayer` of
//! its `/supported` kind ([`Supported::svm_fee_payer`]), which the route's
//! [`PaymentOption::exact_svm`](crate::PaymentOption::exact_svm) must carry.
//!
//! Before a call, the proof is checked in-process as [`SvmVerifier`](crate::svm::SvmVerifier)
//! does, with the requirement's `feePayer` as the only fee payer: a malformed or unsigned
//! transaction costs no facilitator call, and the layer gets the typed proof (its claim key is
//! the message hash, so one transaction is one handler run). The facilitator's answers are
//! hostile input: its `payer` must be the transfer's authority, and a settlement's
//! `transaction` must be a base58 signature that verifies as the fee payer's over this very
//! message (the transaction's id on chain); anything else is an unknown outcome, never a
//! success and never resent.

use crate::Network;
use crate::proto::svm::Pubkey;

use super::Supported;

impl Supported {
    /// The fee payer this facilitator co-signs Solana `exact` payments with on `network`
    /// (`extra.feePayer` of its v2 `exact` kind): what to pass to
    /// `PaymentOption::exact_svm` (feature `svm`) when it settles.
    pub fn svm_fee_payer(&self, network: Network) -> Option<Pubkey> {
        self.kinds
            .iter()
            .filter(|k| k.x402_version == 2 && k.scheme == crate::verify::exact::SCHEME)
            .filter(|k| k.covers(network))
            .find_map(|k| k.extra.as_ref()?.get("feePayer")?.as_str()?.parse().ok())
    }
}

#[cfg(feature = "svm")]
pub(super) use checks::{precheck, same_payer, settled};

#[cfg(feature = "svm")]
mod checks {
    use std::sync::Arc;

    use super::super::{FacilitatorError, unavailable, wire};
    use crate::Network;
    use crate::alert::{Alert, alert};
    use crate::clock::Clock;
    use crate::proto::PaymentPayload;
    use crate::proto::svm::{Pubkey, Signature};
    use crate::proto::v2::PaymentRequirements;
    use crate::settle::Settlement;
    use crate::verify::{SvmProof, VerifiedPayment, VerifyError};

    /// The in-process checks of [`crate::svm::SvmVerifier`], trusting the server's own
    /// `extra.feePayer` (the facilitator's key): without one, the verifier's
    /// `missing_fee_payer` refusal.
    pub(in crate::facilitator) fn precheck(
        payload: &PaymentPayload,
        req: &PaymentRequirements,
        clock: &Arc<dyn Clock>,
    ) -> Result<VerifiedPayment, VerifyError> {
        let fee_payer = req
            .extra_str("feePayer")
            .and_then(|s| s.parse::<Pubkey>().ok());
        crate::svm::SvmVerifier::new(fee_payer)
            .with_clock(Arc::clone(clock))
            .verify_sync(payload, req)
    }

    /// A `/verify` reply's `payer` must be the transfer's authority.
    pub(in crate::facilitator) fn same_payer(
        proof: &SvmProof,
        payer: &str,
    ) -> Result<(), VerifyError> {
        // The reference answers `payer: ""` with refusals only; an approval names the payer.
        if payer.parse::<Pubkey>() == Ok(proof.payer) {
            return Ok(());
        }
        Err(unavailable(
            FacilitatorError::Inconsistent("payer is not the transfer's authority"),
            None,
        ))
    }

    /// A successful `/settle` reply for `proof` on `network`, checked; an inconsistent one is
    /// alerted (the facilitator may have moved the money: only the chain knows).
    pub(in crate::facilitator) fn settled(
        proof: &SvmProof,
        network: Network,
        answer: &wire::SettleReply,
    ) -> Result<Settlement, FacilitatorError> {
        checked(proof, network, answer).inspect_err(|e| {
            alert!(
                Alert::HostileReply,
                cause = e,
                "a facilitator claimed a Solana settlement it cannot prove; the outcome is unknown, the proof stays claimed: look its transaction up on chain"
            );
        })
    }

    fn checked(
        proof: &SvmProof,
        network: Network,
        answer: &wire::SettleReply,
    ) -> Result<Settlement, FacilitatorError> {
        let signature = answer
            .transaction
            .as_deref()
            .and_then(|s| s.parse::<Signature>().ok())
            .ok_or(FacilitatorError::Inconsistent(
                "success without a transaction signature",
            ))?;
        if !is_fee_payers(proof, &signature) {
            return Err(FacilitatorError::Inconsistent(
                "the signature is not the fee payer's over this transaction",
            ));
        }
        if answer
            .network
            .as_deref()
            .is_some_and(|n| n.parse::<Network>() != Ok(network))
        {
            return Err(FacilitatorError::Inconsistent("settled on another network"));
        }
        if answer
            .payer
            .as_deref()
            .filter(|p| !p.is_empty())
            .is_some_and(|p| p.parse::<Pubkey>() != Ok(proof.payer))
        {
            return Err(FacilitatorError::Inconsistent("settled for another payer"));
        }
        Ok(Settlement {
            signature: Some(signature),
            ..Settlement::default()
        })
    }

    /// Whether `signature` is the fee payer's over the proof's message: the id the chain gives
    /// this transaction, which the facilitator cannot forge for another one.
    fn is_fee_payers(proof: &SvmProof, signature: &Signature) -> bool {
        let Ok(tx) = crate::svm::tx::decode(&proof.transaction) else {
            return false;
        };
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(proof.fee_payer.as_bytes()) else {
            return false;
        };
        key.verify_strict(
            tx.message,
            &ed25519_dalek::Signature::from_bytes(&signature.0),
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fee_payer_comes_from_the_v2_exact_kind_of_the_network() {
        let s: Supported = serde_json::from_str(
            r#"{"kinds":[
                {"x402Version":1,"scheme":"exact","network":"solana-devnet","extra":{"feePayer":"2wKupLR9q6wXYppw8Gr2NvWxKBUqm4PPJKkQfoxHDBg4"}},
                {"x402Version":2,"scheme":"exact","network":"solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1","extra":{"feePayer":"EwWqGE4ZFKLofuestmU4LDdK7XM1N4ALgdZccwYugwGd"}},
                {"x402Version":2,"scheme":"exact","network":"solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp","extra":{"feePayer":"not base58!"}}
            ],"extensions":[],"signers":{}}"#,
        )
        .unwrap();
        assert_eq!(
            s.svm_fee_payer(Network::SOLANA_DEVNET),
            Some(Pubkey::from_static(
                "EwWqGE4ZFKLofuestmU4LDdK7XM1N4ALgdZccwYugwGd"
            ))
        );
        assert_eq!(s.svm_fee_payer(Network::SOLANA), None, "malformed key");
        assert_eq!(s.svm_fee_payer(Network::SOLANA_TESTNET), None);
    }
}
