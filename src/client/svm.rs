//! [`SvmPayer`]: pays Solana `exact` offers as `@x402/svm` 2.27's client does.
//!
//! The mint's owner (SPL Token or Token-2022) and decimals are read from the chain
//! (`getAccountInfo`, cached per mint), the blockhash from `getLatestBlockhash`, and the
//! transaction is built by [`crate::svm::pay`] and signed by the payer as the transfer
//! authority. The fee payer is the server's `extra.feePayer`: the payer's key never pays fees
//! and the server's never signs a transfer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::{B256, U256};
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::challenge::{Challenge, Offer};
use super::signer::{Proof, envelope, random_b256};
use crate::proto::exact::Authorization;
use crate::proto::svm::Pubkey;
use crate::svm::pay::{MAX_MEMO_BYTES, Transfer, exact_transaction};
use crate::svm::{Keypair, program};

/// The largest JSON-RPC reply read (a mint account is 82 bytes, Token-2022 ones a little more).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// A Solana payer for [`PayingLayer::svm`](super::PayingLayer::svm): an ed25519 key and the
/// JSON-RPC endpoint the transaction is built against (mint and blockhash; nothing is sent).
#[derive(Clone)]
pub struct SvmPayer {
    keypair: Keypair,
    url: String,
    http: reqwest::Client,
    /// mint → (token program, decimals): a mint's owner and decimals never change.
    mints: Arc<Mutex<HashMap<Pubkey, (Pubkey, u8)>>>,
}

impl std::fmt::Debug for SvmPayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvmPayer")
            .field("payer", &self.keypair.pubkey())
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl std::fmt::Display) -> alloy_signer::Error {
    alloy_signer::Error::other(format!("svm: {msg}"))
}

impl SvmPayer {
    /// Pays with `keypair`, reading the chain through the JSON-RPC endpoint `rpc_url`.
    ///
    /// # Errors
    /// The HTTP client cannot be built (no TLS roots).
    pub fn new(keypair: Keypair, rpc_url: impl Into<String>) -> Result<Self, reqwest::Error> {
        Ok(Self {
            keypair,
            url: rpc_url.into(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
            mints: Arc::default(),
        })
    }

    /// The payer's address.
    pub fn pubkey(&self) -> Pubkey {
        self.keypair.pubkey()
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, alloy_signer::Error> {
        crate::svm::rpc::call(&self.http, &self.url, method, params, MAX_REPLY_BYTES)
            .await
            .map_err(err)
    }

    /// The mint's token program and decimals, from its account.
    async fn mint(&self, mint: Pubkey) -> Result<(Pubkey, u8), alloy_signer::Error> {
        let cached = self
            .mints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&mint)
            .copied();
        if let Some(m) = cached {
            return Ok(m);
        }
        let v = self
            .call(
                "getAccountInfo",
                json!([mint.to_string(), {"encoding": "base64"}]),
            )
            .await?;
        let account = &v["value"];
        let owner: Pubkey = account["owner"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("mint account not found"))?;
        if owner != program::TOKEN && owner != program::TOKEN_2022 {
            return Err(err("asset was not created by a known token program"));
        }
        let data = account["data"][0]
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| err("mint account data unreadable"))?;
        // SPL mint layout: authority option (36), supply (8), then decimals.
        let decimals = *data.get(44).ok_or_else(|| err("not a mint account"))?;
        self.mints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(mint, (owner, decimals));
        Ok((owner, decimals))
    }

    async fn blockhash(&self) -> Result<[u8; 32], alloy_signer::Error> {
        let v = self
            .call("getLatestBlockhash", json!([{"commitment": "confirmed"}]))
            .await?;
        let hash: Pubkey = v["value"]["blockhash"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("no blockhash in the RPC reply"))?;
        Ok(*hash.as_bytes())
    }

    /// Builds, signs and wraps the transaction paying `offer`.
    pub(crate) async fn proof(
        &self,
        challenge: &Challenge,
        offer: &Offer,
        now: u64,
    ) -> Result<Proof, alloy_signer::Error> {
        let req = &offer.requirements;
        let mint = req.asset.svm().ok_or_else(|| err("asset is not a mint"))?;
        let pay_to = req.pay_to.svm().ok_or_else(|| err("payTo is not a key"))?;
        let fee_payer = super::svm_fee_payer(req).ok_or_else(|| err("no extra.feePayer"))?;
        let amount = u64::try_from(req.amount).map_err(|_| err("amount over u64"))?;
        let memo = match req.extra_str("memo").filter(|m| !m.is_empty()) {
            Some(m) if m.len() > MAX_MEMO_BYTES => return Err(err("extra.memo too long")),
            Some(m) => m.as_bytes().to_vec(),
            None => {
                let r = random_b256().ok_or_else(|| err("no OS randomness for the memo"))?;
                alloy_primitives::hex::encode(&r[..16]).into_bytes()
            }
        };
        let (token_program, decimals) = self.mint(mint).await?;
        let blockhash = self.blockhash().await?;
        let tx = exact_transaction(
            &self.keypair,
            &Transfer {
                fee_payer,
                mint,
                token_program,
                decimals,
                pay_to,
                amount,
                blockhash,
                memo: &memo,
            },
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(&tx);
        let (name, value, payment_id) =
            envelope(challenge, offer, json!({ "transaction": encoded }))?;
        // The report's EIP-3009-shaped terms: the amount, the window the server may take, and
        // as nonce the hash of the signed message (the server's claim key).
        let message = crate::svm::tx::decode(&tx)
            .map_err(|_| err("built an undecodable transaction"))?
            .message;
        let authorization = Authorization {
            from: alloy_primitives::Address::ZERO,
            to: alloy_primitives::Address::ZERO,
            value: req.amount,
            valid_after: U256::from(now),
            valid_before: U256::from(now.saturating_add(req.max_timeout_seconds)),
            nonce: B256::from(<[u8; 32]>::from(Sha256::digest(message))),
        };
        Ok(Proof {
            name,
            value,
            authorization,
            permit: None,
            payment_id,
            channel: None,
        })
    }
}
