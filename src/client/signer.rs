//! Signing a payment with any alloy [`Signer`] and encoding the proof header.
//!
//! `exact`: EIP-712 over `TransferWithAuthorization` with the domain `name`/`version` from the
//! requirement's `extra`, `chainId` from its network and `verifyingContract` = the token.
//!
//! `upto`: EIP-712 over Permit2's `PermitWitnessTransferFrom` (domain `name: "Permit2"`,
//! `chainId`, `verifyingContract` = Permit2), as `@x402/evm` 2.27's `UptoEvmScheme` signs it:
//! the maximum of `asset`, spender = the x402 upto proxy, a random 256-bit nonce, deadline
//! `now + maxTimeoutSeconds`, witness `{to: payTo, facilitator: extra.facilitatorAddress,
//! validAfter: 0}`.
//!
//! Signing goes through [`Signer::sign_typed_data`], so hardware wallets that refuse raw
//! hashes (Ledger) sign the typed data they can display.

use alloy_primitives::{Address, B256, Bytes, U256};
use alloy_signer::Signer;
use alloy_sol_types::Eip712Domain;
use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use super::challenge::{Challenge, Offer};
use super::policy::facilitator;
use crate::proto::X402Version;
use crate::proto::exact::{Authorization, ExactEvmPayload};
use crate::proto::header::{self, PAYMENT_SIGNATURE, X_PAYMENT};
use crate::proto::upto::{Permit2Authorization, TokenPermissions, UptoEvmPayload, UptoWitness};
use crate::proto::v2::PaymentRequirements;

// The same struct the verifier hashes: what the client signs is what the server checks.
use crate::verify::exact::TransferWithAuthorization;
use crate::verify::upto;

/// The x402 extension that carries an idempotency id.
pub(crate) const PAYMENT_IDENTIFIER: &str = "payment-identifier";

/// How far back `validAfter` is set, as the reference client does: tolerates a server clock
/// that runs behind ours.
const VALID_AFTER_SLACK: u64 = 600;

/// A signed proof, ready to send (and to resend unchanged).
#[derive(Clone, Debug)]
pub(crate) struct Proof {
    pub(crate) name: HeaderName,
    pub(crate) value: HeaderValue,
    /// For `upto`, the permit's mirror (see [`PaymentReport`](super::PaymentReport)).
    pub(crate) authorization: Authorization,
    /// The signed Permit2 permit of an `upto` payment.
    pub(crate) permit: Option<Permit2Authorization>,
    pub(crate) payment_id: Option<String>,
    /// A channel payment's ticket (holds the channel's lock until the call ends).
    pub(crate) channel: Option<super::channel::Ticket>,
}

/// 32 bytes of OS randomness, `None` if the OS has none to give.
pub(crate) fn random_b256() -> Option<B256> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(B256::from(b))
}

fn no_randomness() -> alloy_signer::Error {
    alloy_signer::Error::other("no OS randomness for the authorization nonce")
}

/// The EIP-712 domain of the token in `req`, `None` without `extra.name`/`extra.version`.
pub(crate) fn domain(req: &PaymentRequirements) -> Option<Eip712Domain> {
    Some(Eip712Domain::new(
        Some(req.extra_str("name")?.to_owned().into()),
        Some(req.extra_str("version")?.to_owned().into()),
        Some(U256::from(req.network.chain_id())),
        Some(req.asset.evm()?),
        None,
    ))
}

/// Signs `auth` for `req` with `signer`: 65 bytes `r ‖ s ‖ v`, `v ∈ {27, 28}`, low `s`.
pub(crate) async fn sign<Sg>(
    signer: &Sg,
    req: &PaymentRequirements,
    auth: &Authorization,
) -> Result<Bytes, alloy_signer::Error>
where
    Sg: Signer + Send + Sync,
{
    let domain = domain(req).ok_or_else(|| {
        alloy_signer::Error::other("requirement lacks the EIP-712 name/version in extra")
    })?;
    let message = TransferWithAuthorization::from(auth);
    let sig = signer.sign_typed_data(&message, &domain).await?;
    // USDC rejects high-s; remote signers do not all normalize.
    let sig = sig.normalize_s().unwrap_or(sig);
    Ok(Bytes::copy_from_slice(&sig.as_bytes()))
}

/// The EVM address of an EVM requirement (the client pays EVM offers only).
fn evm(account: crate::proto::Account) -> Result<Address, alloy_signer::Error> {
    account
        .evm()
        .ok_or_else(|| alloy_signer::Error::other("not an EVM requirement"))
}

/// The authorization to sign for `req` at `now` (Unix seconds), with a random nonce.
pub(crate) fn authorization(
    req: &PaymentRequirements,
    from: Address,
    now: u64,
) -> Result<Authorization, alloy_signer::Error> {
    Ok(Authorization {
        from,
        to: evm(req.pay_to)?,
        value: req.amount,
        valid_after: U256::from(now.saturating_sub(VALID_AFTER_SLACK)),
        valid_before: U256::from(now.saturating_add(req.max_timeout_seconds)),
        nonce: random_b256().ok_or_else(no_randomness)?,
    })
}

/// The Permit2 permit to sign for the `upto` requirement `req` at `now` (Unix seconds): what
/// `@x402/evm` 2.27's `UptoEvmScheme` builds.
pub(crate) fn permit(
    req: &PaymentRequirements,
    from: Address,
    now: u64,
) -> Result<Permit2Authorization, alloy_signer::Error> {
    let facilitator = facilitator(req).ok_or_else(|| {
        alloy_signer::Error::other("upto requirement lacks extra.facilitatorAddress")
    })?;
    Ok(Permit2Authorization {
        from,
        permitted: TokenPermissions {
            token: evm(req.asset)?,
            amount: req.amount,
        },
        spender: upto::UPTO_PROXY,
        nonce: U256::from_be_bytes(random_b256().ok_or_else(no_randomness)?.0),
        deadline: U256::from(now.saturating_add(req.max_timeout_seconds)),
        witness: UptoWitness {
            to: evm(req.pay_to)?,
            facilitator,
            // The official client's choice: valid at once, however the clocks differ.
            valid_after: U256::ZERO,
        },
    })
}

/// Signs `permit` on `req`'s chain: 65 bytes `r ‖ s ‖ v`, low `s`.
pub(crate) async fn sign_permit<Sg>(
    signer: &Sg,
    req: &PaymentRequirements,
    permit: &Permit2Authorization,
) -> Result<Bytes, alloy_signer::Error>
where
    Sg: Signer + Send + Sync,
{
    let domain = upto::permit2_domain(req.network.chain_id());
    let sig = signer
        .sign_typed_data(&upto::typed_message(permit), &domain)
        .await?;
    // The server (like USDC for `exact`) refuses high-s signatures.
    let sig = sig.normalize_s().unwrap_or(sig);
    Ok(Bytes::copy_from_slice(&sig.as_bytes()))
}

/// The permit's terms in the EIP-3009 shape every report has: payer, recipient, maximum,
/// window and nonce (as 32 bytes). Not an EIP-3009 authorization: nothing settles it.
fn mirror(permit: &Permit2Authorization) -> Authorization {
    Authorization {
        from: permit.from,
        to: permit.witness.to,
        value: permit.permitted.amount,
        valid_after: permit.witness.valid_after,
        valid_before: permit.deadline,
        nonce: B256::from(permit.nonce),
    }
}

/// A fresh `payment-identifier` id: `pay_` and 32 hex digits (the reference's form).
fn payment_id() -> Option<String> {
    let r = random_b256()?;
    Some(format!("pay_{}", alloy_primitives::hex::encode(&r[..16])))
}

/// Signs a proof for `offer` of `challenge` and encodes its header.
pub(crate) async fn proof<Sg>(
    signer: &Sg,
    challenge: &Challenge,
    offer: &Offer,
    now: u64,
) -> Result<Proof, alloy_signer::Error>
where
    Sg: Signer + Send + Sync,
{
    let req = &offer.requirements;
    let (payload, authorization, permit) = if req.scheme == upto::SCHEME {
        if challenge.version != X402Version::V2 {
            // The policy refuses these; never send a payload no v1 server reads.
            return Err(alloy_signer::Error::other("upto is an x402 v2 scheme"));
        }
        let permit = permit(req, signer.address(), now)?;
        let signature = sign_permit(signer, req, &permit).await?;
        let payload = UptoEvmPayload {
            signature,
            permit2_authorization: permit.clone(),
        };
        let payload = serde_json::to_value(payload).map_err(alloy_signer::Error::other)?;
        (payload, mirror(&permit), Some(permit))
    } else {
        let authorization = authorization(req, signer.address(), now)?;
        let signature = sign(signer, req, &authorization).await?;
        let payload = ExactEvmPayload {
            signature,
            authorization: authorization.clone(),
        };
        let payload = serde_json::to_value(payload).map_err(alloy_signer::Error::other)?;
        (payload, authorization, None)
    };
    let (name, value, payment_id) = envelope(challenge, offer, payload)?;
    Ok(Proof {
        name,
        value,
        authorization,
        permit,
        payment_id,
        channel: None,
    })
}

/// Wraps a scheme `payload` for `offer` of `challenge` in the header its version speaks: the
/// header's name and value, and the `payment-identifier` id added, if any.
pub(crate) fn envelope(
    challenge: &Challenge,
    offer: &Offer,
    payload: Value,
) -> Result<(HeaderName, HeaderValue, Option<String>), alloy_signer::Error> {
    let req = &offer.requirements;
    let mut payment_id = None;
    let (name, doc) = match challenge.version {
        X402Version::V1 => (
            X_PAYMENT,
            json!({
                "x402Version": 1,
                "scheme": req.scheme,
                "network": X402Version::V1.network_name(req.network),
                "payload": payload,
            }),
        ),
        X402Version::V2 => {
            let mut doc = json!({ "x402Version": 2, "payload": payload });
            doc["accepted"] = match &offer.raw {
                Some(raw) => serde_json::from_str(raw.get()).unwrap_or_else(|_| json!(req)),
                None => json!(req),
            };
            if let Some(resource) = &challenge.resource {
                doc["resource"] = serde_json::from_str(resource.get()).unwrap_or(Value::Null);
            }
            if let Some(ext) = &challenge.extensions {
                let mut ext = ext.clone();
                payment_id = add_payment_id(&mut ext);
                doc["extensions"] = Value::Object(ext);
            }
            (PAYMENT_SIGNATURE, doc)
        }
    };
    let json = serde_json::to_vec(&doc).map_err(alloy_signer::Error::other)?;
    Ok((name, header::encode_json(&json), payment_id))
}

/// Adds an id to a declared `payment-identifier` extension (`info` an object), as the
/// reference client does; leaves other extensions as the server wrote them.
fn add_payment_id(ext: &mut Map<String, Value>) -> Option<String> {
    let info = ext
        .get_mut(PAYMENT_IDENTIFIER)?
        .as_object_mut()?
        .get_mut("info")?
        .as_object_mut()?;
    let id = payment_id()?;
    info.insert("id".into(), Value::String(id.clone()));
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::exact::{domain_separator, recover_signer, signing_hash};
    use crate::{Asset, PaymentOption};
    use alloy_signer_local::PrivateKeySigner;

    #[tokio::test]
    async fn signature_recovers_to_the_signer_under_the_crate_digest() {
        let signer = PrivateKeySigner::random();
        let req = PaymentOption::exact(&Asset::usdc_base(), "$0.01", Address::repeat_byte(7))
            .unwrap()
            .requirements()
            .clone();
        let auth = authorization(&req, signer.address(), 1_750_000_000).unwrap();
        assert_eq!(
            auth.valid_before,
            U256::from(1_750_000_000 + req.max_timeout_seconds)
        );
        let sig = sign(&signer, &req, &auth).await.unwrap();
        let digest = signing_hash(
            domain_separator("USD Coin", "2", 8453, req.asset.evm().unwrap()),
            &auth,
        );
        assert_eq!(recover_signer(digest, &sig).unwrap(), signer.address());
    }

    #[tokio::test]
    async fn upto_proof_is_the_official_permit_and_passes_the_crate_verifier() {
        use crate::clock::FixedClock;
        use crate::proto::{PaymentPayload, v2};

        const NOW: u64 = 1_750_000_000;
        let signer = PrivateKeySigner::random();
        let facilitator = Address::repeat_byte(0xfa);
        let req = PaymentOption::upto_atomic(
            &Asset::usdc_base_sepolia(),
            U256::from(50_000),
            Address::repeat_byte(7),
            facilitator,
        )
        .unwrap()
        .requirements()
        .clone();
        let doc = json!({"x402Version": 2, "resource": {"url": "http://x/y"}, "accepts": [req]});
        let challenge = Challenge::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let offer = challenge.offers[0].as_ref().unwrap();
        let proof = proof(&signer, &challenge, offer, NOW).await.unwrap();
        assert_eq!(proof.name, PAYMENT_SIGNATURE);

        let permit = proof.permit.clone().unwrap();
        assert_eq!(permit.from, signer.address());
        assert_eq!(permit.permitted.token, req.asset);
        assert_eq!(permit.permitted.amount, U256::from(50_000));
        assert_eq!(permit.spender, upto::UPTO_PROXY);
        assert_eq!(permit.deadline, U256::from(NOW + req.max_timeout_seconds));
        assert_eq!(permit.witness.to, req.pay_to);
        assert_eq!(permit.witness.facilitator, facilitator);
        assert_eq!(permit.witness.valid_after, U256::ZERO);
        assert_eq!(proof.authorization, mirror(&permit));

        let json = header::decode_bytes(&proof.value, 1 << 16).unwrap();
        let sent: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(sent["accepted"], json!(req));
        assert!(sent["payload"]["authorization"].is_null());
        let payload: UptoEvmPayload = serde_json::from_value(sent["payload"].clone()).unwrap();
        assert_eq!(payload.permit2_authorization, permit);
        let digest = upto::signing_hash(84532, &permit);
        assert_eq!(
            recover_signer(digest, &payload.signature).unwrap(),
            signer.address()
        );
        let payload =
            PaymentPayload::V2(serde_json::from_slice::<v2::PaymentPayload>(&json).unwrap());
        let verified = crate::verify::UptoEvmVerifier::new()
            .with_clock(FixedClock::new(NOW + 1))
            .verify_sync(&payload, &req)
            .unwrap();
        assert!(verified.is_upto());
        assert_eq!(verified.payer, signer.address());

        // Two proofs never share a Permit2 nonce.
        let again = super::proof(&signer, &challenge, offer, NOW).await.unwrap();
        assert_ne!(again.permit.unwrap().nonce, permit.nonce);
    }

    #[test]
    fn payment_id_goes_into_a_declared_extension_only() {
        let mut ext: Map<String, Value> = serde_json::from_str(
            r#"{"payment-identifier":{"info":{"required":true},"schema":{}},"bazaar":{"info":{}}}"#,
        )
        .unwrap();
        let id = add_payment_id(&mut ext).unwrap();
        assert!(id.starts_with("pay_") && id.len() == 36);
        assert_eq!(ext["payment-identifier"]["info"]["id"], id.as_str());
        assert_eq!(ext["payment-identifier"]["info"]["required"], true);
        assert!(ext["bazaar"]["info"].get("id").is_none());
        let mut none = Map::new();
        assert_eq!(add_payment_id(&mut none), None);
    }
}
