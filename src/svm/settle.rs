//! [`SvmSettler`]: co-signs a verified Solana transaction as its fee payer and submits it
//! through a Solana JSON-RPC endpoint.
//!
//! What happens to a payment:
//!
//! * `check` (before the handler): the transaction, co-signed, is simulated; a failure
//!   (insufficient funds, an expired blockhash, a missing account) refuses it with
//!   `invalid_exact_svm_transaction_simulation_failed` and the handler does not run. An RPC
//!   that cannot be reached answers 503 (nothing was sent).
//! * `settle`: `sendTransaction`, then `getSignatureStatuses` until the transaction is
//!   confirmed or failed. The transaction's id is the fee payer's signature, known before it
//!   is sent, so an answer lost after the request left (a reset connection, a timeout, an
//!   RPC error that is not a preflight refusal) is reconciled from the signature's status,
//!   never by sending again: found, it is the outcome; not found in time, the outcome is
//!   unknown ([`SettleError::Unknown`]), the proof stays claimed, and it is alerted.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde_json::{Value, json};

use super::Keypair;
use super::rpc::{self, Failure};
use super::tx;
use crate::Network;
use crate::alert::{Alert, alert};
use crate::proto::svm::Signature;
use crate::reason::Reason;
use crate::settle::{SettleError, Settlement, Settler};
use crate::verify::{SvmProof, VerifiedPayment};

/// The largest JSON-RPC reply read (status lists and simulation logs are far smaller).
const MAX_REPLY_BYTES: usize = 1 << 20;
/// The JSON-RPC code of a preflight (simulation) refusal: the transaction was not forwarded.
const PREFLIGHT_FAILURE: i64 = -32002;

/// Settles Solana `exact` payments as their fee payer, through one RPC endpoint.
#[derive(Clone, Debug)]
pub struct SvmSettler {
    http: reqwest::Client,
    url: String,
    fee_payer: Keypair,
    network: Network,
    confirm_timeout: Duration,
    poll: Duration,
}

impl SvmSettler {
    /// Settles on `network` through the JSON-RPC endpoint `url`, paying fees with
    /// `fee_payer` (its key must be the requirement's `extra.feePayer`).
    ///
    /// # Errors
    /// The HTTP client cannot be built (no TLS roots).
    pub fn new(
        url: impl Into<String>,
        network: Network,
        fee_payer: Keypair,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            url: url.into(),
            fee_payer,
            network,
            confirm_timeout: Duration::from_secs(60),
            poll: Duration::from_millis(200),
        })
    }

    /// Waits at most `timeout` (default 60 s, the blockhash's lifetime) for confirmation.
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The fee payer's key.
    pub fn fee_payer(&self) -> crate::proto::svm::Pubkey {
        self.fee_payer.pubkey()
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, Failure> {
        rpc::call(&self.http, &self.url, method, params, MAX_REPLY_BYTES).await
    }

    /// The proof, if it is ours to settle.
    fn ours<'a>(&self, payment: &'a VerifiedPayment) -> Result<&'a SvmProof, SettleError> {
        let refused = |reason| SettleError::Refused {
            reason,
            transaction: None,
        };
        let proof = payment.svm().ok_or(refused(Reason::InvalidNetwork))?;
        if payment.network != self.network {
            return Err(refused(Reason::InvalidNetwork));
        }
        if proof.fee_payer != self.fee_payer.pubkey() {
            return Err(refused(Reason::InvalidExactSvmFeePayerMismatch));
        }
        Ok(proof)
    }

    /// The transaction with the fee payer's signature, and that signature (its id).
    fn cosign(&self, proof: &SvmProof) -> Result<(Vec<u8>, [u8; 64]), SettleError> {
        let mut bytes = proof.transaction.to_vec();
        let decoded = tx::decode(&bytes).map_err(|_| SettleError::Refused {
            reason: Reason::InvalidExactSvmPayloadTransactionCouldNotBeDecoded,
            transaction: None,
        })?;
        let signature = self.fee_payer.sign(decoded.message);
        // The first signature follows the one-byte count (a verified transaction has 1 to 2
        // signatures, so its compact-u16 count is one byte).
        bytes[1..65].copy_from_slice(&signature);
        Ok((bytes, signature))
    }

    fn unavailable(source: crate::store::BoxError) -> SettleError {
        SettleError::Unavailable {
            retry_after: None,
            source,
        }
    }

    /// The signature's status: `Some(Ok)` confirmed, `Some(Err)` failed on chain, `None`
    /// not seen (yet).
    async fn status(&self, id: &str) -> Result<Option<Result<(), String>>, Failure> {
        let v = self
            .call(
                "getSignatureStatuses",
                json!([[id], {"searchTransactionHistory": true}]),
            )
            .await?;
        let Some(s) = v
            .get("value")
            .and_then(|l| l.get(0))
            .filter(|s| !s.is_null())
        else {
            return Ok(None);
        };
        if let Some(err) = s.get("err").filter(|e| !e.is_null()) {
            return Ok(Some(Err(err.to_string().chars().take(300).collect())));
        }
        let level = s.get("confirmationStatus").and_then(Value::as_str);
        Ok(matches!(level, Some("confirmed" | "finalized")).then_some(Ok(())))
    }

    /// Polls the status until it is final or the wait is over.
    async fn outcome(&self, signature: Signature, cause: &str) -> Result<Settlement, SettleError> {
        let id = &signature.to_string();
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        loop {
            match self.status(id).await {
                Ok(Some(Ok(()))) => {
                    return Ok(Settlement {
                        signature: Some(signature),
                        ..Settlement::default()
                    });
                }
                Ok(Some(Err(err))) => {
                    return Err(SettleError::Refused {
                        reason: Reason::InvalidExactSvmTransactionFailed,
                        transaction: None,
                    })
                    .inspect_err(|_| {
                        log::debug!("solana transaction {id} failed on chain: {err}");
                    });
                }
                Ok(None) | Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let e: crate::store::BoxError =
                    format!("solana transaction {id}: no final status in time ({cause})").into();
                alert!(
                    Alert::SettlementUnknown,
                    cause = &*e,
                    "a Solana payment was sent but its outcome is unknown; its proof stays claimed until the blockhash expires, reconcile {id} by hand"
                );
                return Err(SettleError::Unknown {
                    transaction: None,
                    retry_after: None,
                    source: e,
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

#[async_trait]
impl Settler for SvmSettler {
    async fn check(&self, payment: &VerifiedPayment) -> Result<(), SettleError> {
        let proof = self.ours(payment)?;
        let (bytes, _) = self.cosign(proof)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let sim = self
            .call(
                "simulateTransaction",
                json!([encoded, {"encoding": "base64", "sigVerify": true, "commitment": "confirmed"}]),
            )
            .await
            .map_err(|f| match f {
                Failure::NotSent(e) | Failure::Lost(e) => Self::unavailable(e),
                Failure::Rpc { message, .. } => Self::unavailable(message.into()),
            })?;
        match sim.get("value").and_then(|v| v.get("err")) {
            Some(err) if !err.is_null() => Err(SettleError::Refused {
                reason: Reason::InvalidExactSvmTransactionSimulationFailed,
                transaction: None,
            }),
            Some(_) => Ok(()),
            None => Err(Self::unavailable("simulateTransaction: no value".into())),
        }
    }

    async fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        let proof = self.ours(payment)?;
        let (bytes, signature) = self.cosign(proof)?;
        let id = bs58::encode(signature).into_string();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let sent = self
            .call(
                "sendTransaction",
                json!([encoded, {"encoding": "base64", "preflightCommitment": "confirmed"}]),
            )
            .await;
        match sent {
            Ok(_) => self.outcome(Signature(signature), "sent").await,
            // A preflight refusal: the RPC simulated it, it failed, nothing was forwarded.
            Err(Failure::Rpc { code, message }) if code == PREFLIGHT_FAILURE => {
                log::debug!("solana transaction {id} refused in preflight: {message}");
                Err(SettleError::Refused {
                    reason: Reason::InvalidExactSvmTransactionFailed,
                    transaction: None,
                })
            }
            Err(Failure::NotSent(e)) => Err(Self::unavailable(e)),
            // The request left: whatever the reply, only the chain knows. Never send again.
            Err(Failure::Lost(e)) => self.outcome(Signature(signature), &e.to_string()).await,
            Err(Failure::Rpc { message, .. }) => self.outcome(Signature(signature), &message).await,
        }
    }
}
