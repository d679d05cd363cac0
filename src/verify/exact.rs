//! In-process verifier for the `exact` scheme on EVM chains (EIP-3009 on USDC).
//!
//! Checks, cheapest first so a hostile proof costs as little as possible:
//! scheme, network, EIP-712 domain present, payload shape, recipient, exact value,
//! `validAfter <= now`, `validBefore >= now + headroom` and `<= now + maxTimeoutSeconds +
//! skew`, then the signature: 65 bytes, `v ∈ {27, 28}`, low `s`, and the recovered signer
//! equals `from`. The last two mirror what USDC enforces on-chain, so a proof that passes here
//! does not revert at settlement for a signature reason.
//!
//! What is *not* checked here (it needs the chain): the payer's balance and whether the nonce
//! was already used on-chain (the settler's pre-check reads both).
//!
//! # Smart wallets
//!
//! A signature that does not recover to `from` (a contract wallet's ERC-1271 signature, any
//! length, or an ERC-6492 wrapped one of a wallet not deployed yet) is refused unless a
//! [`ContractSignatures`] checker is configured with
//! [`ExactEvmVerifier::with_contract_signatures`]. With one, after every check above (all
//! in-process), in this order:
//!
//! 1. a signature longer than [`MAX_SIGNATURE_BYTES`] is refused (`invalid_exact_evm_signature`),
//!    before any call;
//! 2. an ERC-6492 wrapped signature must decode (`invalid_exact_evm_signature` otherwise) and
//!    name an allowlisted factory ([`ExactEvmVerifier::with_eip6492_factories`], and the
//!    checker's own [`ContractSignatures::eip6492_factories`]): otherwise
//!    `eip6492_factory_not_allowed`, before any call. The allowlist is empty by default, so
//!    undeployed wallets pay only where a factory was allowlisted. The factory is checked
//!    whether or not the wallet is deployed already (telling would cost a second call);
//! 3. ONE `eth_call` of the ERC-6492 universal validator over the EIP-712 digest of the
//!    `TransferWithAuthorization`: valid → accepted; invalid (or the call reverts) →
//!    `invalid_exact_evm_signature`; an RPC error or timeout → [`VerifyError::Unavailable`]
//!    (503 with `Retry-After`; nothing was claimed, the client retries the same proof).
//!
//! A signature that recovers to `from` never reaches the chain: EOA payments stay fully
//! in-process, with no RPC.

use std::sync::Arc;

use alloy_primitives::{Address, B256, Keccak256, U256, keccak256};
use alloy_sol_types::Eip712Domain;

use secp256k1::Message;
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};

use super::wallet::{ContractSignatures, Erc6492, MAX_SIGNATURE_BYTES};
use super::{SignatureError, VerifiedPayment, VerifyError};

use crate::kept::Kept;
use crate::proto::exact::{Authorization, ExactEvmPayload};
use crate::proto::{PaymentPayload, v2::PaymentRequirements};

/// The exact-EVM payload of `payload`, if it pays `req`'s recipient exactly `req`'s amount
/// (what every verifier checks before trusting anything else in it).
pub(crate) fn paying(
    payload: &PaymentPayload,
    req: &PaymentRequirements,
) -> Result<ExactEvmPayload, VerifyError> {
    // A Solana requirement is not for this verifier (its accounts are not addresses).
    let Some(pay_to) = req.pay_to.evm().filter(|_| req.asset.evm().is_some()) else {
        return Err(VerifyError::Scheme(format!(
            "{} on {}",
            req.scheme, req.network
        )));
    };
    // Read already when the header decoder's direct path took it (the usual case).
    let raw = payload.raw_payload();
    let exact: ExactEvmPayload = match raw.exact() {
        Some(exact) => exact.clone(),
        None => ExactEvmPayload::from_json(raw.get()).map_err(VerifyError::InvalidPayload)?,
    };
    let auth = &exact.authorization;
    if auth.to != pay_to {
        return Err(VerifyError::RecipientMismatch {
            paid: auth.to,
            required: pay_to,
        });
    }
    if auth.value != req.amount {
        return Err(VerifyError::ValueMismatch {
            paid: auth.value,
            required: req.amount,
        });
    }
    Ok(exact)
}

/// The EIP-712 struct, in a private module: `sol!` makes its items `pub`, and it is not API.
mod eip712 {
    alloy_sol_types::sol! {
        /// EIP-3009 authorization; field order and names make the token's typehash.
        struct TransferWithAuthorization {
            address from;
            address to;
            uint256 value;
            uint256 validAfter;
            uint256 validBefore;
            bytes32 nonce;
        }
    }
}
#[cfg(any(feature = "client", test))]
pub(crate) use eip712::TransferWithAuthorization;

#[cfg(any(feature = "client", test))]
impl From<&Authorization> for TransferWithAuthorization {
    fn from(auth: &Authorization) -> Self {
        Self {
            from: auth.from,
            to: auth.to,
            value: auth.value,
            validAfter: auth.valid_after,
            validBefore: auth.valid_before,
            nonce: auth.nonce,
        }
    }
}

/// secp256k1 n/2: USDC's ECRecover reverts on any larger `s`.
const HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// The scheme this verifier handles.
pub const SCHEME: &str = "exact";

/// EIP-712 domain separator of an EIP-3009 token.
pub fn domain_separator(
    name: &str,
    version: &str,
    chain_id: u64,
    verifying_contract: Address,
) -> B256 {
    Eip712Domain::new(
        Some(name.to_owned().into()),
        Some(version.to_owned().into()),
        Some(U256::from(chain_id)),
        Some(verifying_contract),
        None,
    )
    .separator()
}

/// `keccak256("TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)")`.
pub const TRANSFER_WITH_AUTHORIZATION_TYPEHASH: B256 =
    alloy_primitives::b256!("0x7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267");

/// EIP-712 `hashStruct` of the authorization.
///
/// Encoded into a fixed buffer with the constant typehash: the same bytes as the `sol!`
/// struct's `eip712_hash_struct` (a unit test pins them together), without its allocations
/// and typehash keccak, which cost as much as the hash itself on the paid path.
///
/// The 224 bytes take two Keccak-f permutations. The first absorbs the typehash, `from`, `to`,
/// `value` and the top 8 bytes of `validAfter` (zero for any time before the year 2^64 s):
/// the same for every payment of one payer to one recipient at one price, so a thread keeps
/// the state after it for its last few such blocks and a repeat payer's hash costs one
/// permutation. The whole block is compared, so the hash is the same either way.
pub fn struct_hash(auth: &Authorization) -> B256 {
    let mut buf = [0u8; 224];
    buf[..32].copy_from_slice(TRANSFER_WITH_AUTHORIZATION_TYPEHASH.as_slice());
    buf[44..64].copy_from_slice(auth.from.as_slice());
    buf[76..96].copy_from_slice(auth.to.as_slice());
    buf[96..128].copy_from_slice(&auth.value.to_be_bytes::<32>());
    buf[128..160].copy_from_slice(&auth.valid_after.to_be_bytes::<32>());
    buf[160..192].copy_from_slice(&auth.valid_before.to_be_bytes::<32>());
    buf[192..].copy_from_slice(auth.nonce.as_slice());
    let (first, rest) = buf.split_at(FIRST_BLOCK);
    let mut hasher = FIRST_BLOCKS.with_borrow_mut(|kept| kept.absorbed(first));
    hasher.update(rest);
    hasher.finalize()
}

/// Keccak-256's rate: the bytes one permutation absorbs.
const FIRST_BLOCK: usize = 136;

/// A thread's last [`FirstBlocks::SLOTS`] first blocks of a struct hash and the Keccak state
/// after each, replaced in turn.
#[derive(Default)]
struct FirstBlocks {
    slots: Kept<([u8; FIRST_BLOCK], Keccak256), { FirstBlocks::SLOTS }>,
}

impl FirstBlocks {
    const SLOTS: usize = 8;

    /// A hasher that has absorbed `block`: a kept state's copy, or a new one (then kept).
    fn absorbed(&mut self, block: &[u8]) -> Keccak256 {
        if let Some((_, state)) = self.slots.iter().find(|(kept, _)| kept[..] == *block) {
            return state.clone();
        }
        let mut hasher = Keccak256::new();
        hasher.update(block);
        let mut kept = [0u8; FIRST_BLOCK];
        kept.copy_from_slice(block);
        self.slots.keep((kept, hasher.clone()));
        hasher
    }
}

thread_local! {
    static FIRST_BLOCKS: std::cell::RefCell<FirstBlocks> = Default::default();
}

/// The digest the payer signs: `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(auth))`.
pub fn signing_hash(domain_separator: B256, auth: &Authorization) -> B256 {
    let mut buf = [0u8; 66];
    buf[0] = 0x19;
    buf[1] = 0x01;
    buf[2..34].copy_from_slice(domain_separator.as_slice());
    buf[34..66].copy_from_slice(struct_hash(auth).as_slice());
    keccak256(buf)
}

/// Recovers the address that signed `digest`, enforcing what USDC enforces on-chain:
/// exactly 65 bytes `r ‖ s ‖ v`, `v ∈ {27, 28}` and `s <= n/2`. Uses libsecp256k1.
pub fn recover_signer(digest: B256, signature: &[u8]) -> Result<Address, SignatureError> {
    recover_key(digest, signature).map(|key| address_of(&key))
}

/// [`recover_signer`] for the request path: a repeat signer's address is kept per thread
/// ([`ADDRESSES`]), so it costs the recovery alone, not the recovery and a Keccak permutation
/// (~4.7k instructions, 1 % of the recovery; a channel's vouchers all have one signer).
pub(crate) fn recover_signer_kept(
    digest: B256,
    signature: &[u8],
) -> Result<Address, SignatureError> {
    let key = recover_key(digest, signature)?;
    Ok(ADDRESSES.with_borrow_mut(|kept| {
        if let Some((_, address)) = kept.iter().find(|(k, _)| k[..] == key[1..]) {
            return *address;
        }
        let address = address_of(&key);
        let mut point = [0u8; 64];
        point.copy_from_slice(&key[1..]);
        kept.keep((point, address));
        address
    }))
}

thread_local! {
    /// Public keys recovered lately on this thread (uncompressed, without the 0x04 tag) and
    /// their addresses: an address is a pure function of its key, so a byte-equal key is the
    /// same address. Reused round-robin.
    static ADDRESSES: std::cell::RefCell<Kept<([u8; 64], Address), 8>> =
        const { std::cell::RefCell::new(Kept::new()) };
}

/// The uncompressed public key (`0x04 ‖ x ‖ y`) that signed `digest`, as [`recover_signer`]
/// checks the signature.
fn recover_key(digest: B256, signature: &[u8]) -> Result<[u8; 65], SignatureError> {
    let sig: &[u8; 65] = signature
        .try_into()
        .map_err(|_| SignatureError::Length(signature.len()))?;
    let v = sig[64];
    let recid = match v {
        27 => RecoveryId::Zero,
        28 => RecoveryId::One,
        _ => return Err(SignatureError::V(v)),
    };
    // Big-endian byte order makes lexicographic comparison numeric.
    if sig[32..64] > HALF_N[..] {
        return Err(SignatureError::HighS);
    }
    let rsig = RecoverableSignature::from_compact(&sig[..64], recid)
        .map_err(|_| SignatureError::Invalid)?;
    let key = rsig
        .recover(Message::from_digest(digest.0))
        .map_err(|_| SignatureError::Invalid)?;
    Ok(key.serialize_uncompressed())
}

/// The address of an uncompressed public key: the last 20 bytes of the Keccak of `x ‖ y`.
fn address_of(key: &[u8; 65]) -> Address {
    Address::from_slice(&keccak256(&key[1..])[12..])
}

/// Domain separators of the few tokens a server accepts: computing one costs four keccaks,
/// as much as the rest of the digest.
#[derive(Default)]
struct SeparatorCache(std::sync::RwLock<Vec<CachedSeparator>>);

/// (chain id, token, EIP-712 name, version) and their separator.
type CachedSeparator = (u64, Address, String, String, B256);

impl SeparatorCache {
    /// Entries kept; a server offers a handful of tokens, anything beyond is computed each time.
    const MAX: usize = 32;

    fn get(&self, name: &str, version: &str, chain_id: u64, asset: Address) -> B256 {
        let hit =
            |e: &&CachedSeparator| e.0 == chain_id && e.1 == asset && e.2 == name && e.3 == version;
        if let Ok(cache) = self.0.read()
            && let Some(e) = cache.iter().find(hit)
        {
            return e.4;
        }
        let sep = domain_separator(name, version, chain_id, asset);
        if let Ok(mut cache) = self.0.write()
            && cache.len() < Self::MAX
            && !cache.iter().any(|e| hit(&e))
        {
            cache.push((chain_id, asset, name.to_owned(), version.to_owned(), sep));
        }
        sep
    }
}

/// In-process verifier of `exact` (EIP-3009) payments on EVM chains; any other scheme is
/// refused ([`super::EvmVerifier`], the layer's default, also takes `upto`). Cheap to clone.
///
/// ```
/// use tower_x402::verify::ExactEvmVerifier;
/// use tower_x402::clock::FixedClock;
/// let verifier = ExactEvmVerifier::new().with_clock(FixedClock::new(1_700_000_000));
/// ```
#[derive(Clone, Default)]
pub struct ExactEvmVerifier {
    pub(super) timing: super::Timing,
    separators: Arc<SeparatorCache>,
    /// Asks the chain about signatures that do not recover to `from` (none: refused).
    wallets: Option<Arc<dyn ContractSignatures>>,
    /// ERC-6492 factories whose undeployed wallets may pay.
    factories: Arc<Vec<Address>>,
}

super::in_process_verifier!(@builders ExactEvmVerifier, timing);

/// What the in-process checks established, before the signer is known.
struct Checked {
    exact: ExactEvmPayload,
    digest: B256,
    valid_before: u64,
}

impl ExactEvmVerifier {
    /// Seconds a proof must still be valid for, so settlement can land before `validBefore`
    /// (the reference uses 6).
    pub const DEFAULT_HEADROOM: u64 = 6;
    /// Seconds of client clock skew tolerated above `now + maxTimeoutSeconds`.
    pub const DEFAULT_MAX_SKEW: u64 = 60;

    /// A verifier on the system clock with the default headroom and skew.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets smart wallets pay: a signature that does not recover in-process to
    /// `authorization.from` is checked by `checker` with one deployless `eth_call` of the
    /// ERC-6492 universal validator (see the [module docs](self#smart-wallets) for the order
    /// of the checks and the answers). Without a checker (the default) such payments are
    /// refused with `invalid_exact_evm_signature`. EOA signatures never reach the checker.
    ///
    /// The checker is an `OnchainSettler` (`onchain` feature: its RPC, its chain and its
    /// ERC-6492 factories, so verifier and settler agree), a `ProviderSignatures`, or your own
    /// [`ContractSignatures`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "onchain")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use alloy_signer_local::PrivateKeySigner;
    /// use tower_x402::primitives::address;
    /// use tower_x402::settle::onchain::OnchainSettler;
    /// use tower_x402::verify::EvmVerifier;
    /// use tower_x402::{Network, PaymentLayer};
    /// let relayer: PrivateKeySigner = std::env::var("RELAYER_KEY")?.parse()?;
    /// // Coinbase Smart Wallet's factory: its undeployed wallets may pay (ERC-6492).
    /// let settler = OnchainSettler::connect("https://sepolia.base.org", relayer)
    ///     .await?
    ///     .with_eip6492_factories([address!("0x0BA5ED0c6AA8c49038F819E587E2633c4A9F428a")]);
    /// let layer = PaymentLayer::builder()
    ///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
    ///     .price("$0.001")
    ///     .network(Network::BASE_SEPOLIA)
    ///     // Smart-wallet signatures are checked on the settler's chain.
    ///     .verifier(EvmVerifier::new().with_contract_signatures(settler.clone()))
    ///     .settler(settler)
    ///     .build()?;
    /// # let _ = layer; Ok(()) }
    /// ```
    #[must_use]
    pub fn with_contract_signatures(mut self, checker: impl ContractSignatures) -> Self {
        self.wallets = Some(Arc::new(checker));
        self
    }

    /// The ERC-6492 factories whose wallets may pay before they are deployed (replaces the
    /// list; default none). A wrapped signature naming another factory is refused with
    /// `eip6492_factory_not_allowed` before any call. The checker's own
    /// [`eip6492_factories`](ContractSignatures::eip6492_factories) are allowed too (an
    /// `OnchainSettler`'s, which deploys such wallets, so set them there).
    ///
    /// Why an allowlist: to settle, the factory call in the signature is sent as a transaction
    /// from the relayer, so an unlisted factory would let any payer make the relayer call any
    /// contract with any data. Empty, the safe default, refuses every undeployed wallet.
    #[must_use]
    pub fn with_eip6492_factories(mut self, factories: impl IntoIterator<Item = Address>) -> Self {
        self.factories = Arc::new(factories.into_iter().collect());
        self
    }

    /// The whole check, synchronously and without the chain: a signature that does not
    /// recover to `from` is refused here ([`Verifier::verify`](super::Verifier::verify) asks
    /// the chain about it when a [checker](Self::with_contract_signatures) is configured).
    pub fn verify_sync(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        let checked = self.check(payload, req)?;
        eoa(&checked)?;
        Ok(accept(payload, req, checked))
    }

    /// Everything but who signed, cheapest first.
    fn check(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<Checked, VerifyError> {
        if payload.scheme() != SCHEME || req.scheme != SCHEME {
            return Err(VerifyError::Scheme(payload.scheme().to_owned()));
        }
        if payload.network() != req.network {
            return Err(VerifyError::NetworkMismatch {
                paid: payload.network(),
                required: req.network,
            });
        }
        let (Some(name), Some(version)) = (req.extra_str("name"), req.extra_str("version")) else {
            return Err(VerifyError::MissingEip712Domain);
        };
        let exact = paying(payload, req)?;
        let auth = &exact.authorization;
        let now = self.timing.clock.now();
        if auth.valid_after > U256::from(now) {
            return Err(VerifyError::NotYetValid {
                valid_after: auth.valid_after,
            });
        }
        if auth.valid_before < U256::from(now.saturating_add(self.timing.headroom)) {
            return Err(VerifyError::Expired {
                valid_before: auth.valid_before,
            });
        }
        let latest = now
            .saturating_add(req.max_timeout_seconds)
            .saturating_add(self.timing.max_skew);
        if auth.valid_before > U256::from(latest) {
            return Err(VerifyError::ValidityTooLong {
                valid_before: auth.valid_before,
                max: latest,
            });
        }
        // In range: `valid_before <= latest`, a u64.
        let valid_before = auth.valid_before.to::<u64>();
        let separator = self.separators.get(
            name,
            version,
            req.network.chain_id(),
            // EVM: `paying` refused any other account.
            req.asset.evm().unwrap_or_default(),
        );
        let digest = signing_hash(separator, auth);
        Ok(Checked {
            exact,
            digest,
            valid_before,
        })
    }

    /// Whether the chain accepts the signature as `from`'s (see the module docs);
    /// `in_process` is the refusal to give when the checker cannot judge this chain.
    async fn contract(
        &self,
        checker: &dyn ContractSignatures,
        chain_id: u64,
        checked: &Checked,
        in_process: VerifyError,
    ) -> Result<(), VerifyError> {
        let signature = &checked.exact.signature;
        if signature.len() > MAX_SIGNATURE_BYTES {
            return Err(SignatureError::TooLong(signature.len()).into());
        }
        if signature.is_empty() {
            return Err(in_process);
        }
        if let Some(wrapped) = Erc6492::decode(signature) {
            let wrapped = wrapped.map_err(|_| SignatureError::Erc6492)?;
            let allowed = |list: &[Address]| list.contains(&wrapped.factory);
            if !allowed(&self.factories) && !allowed(checker.eip6492_factories()) {
                return Err(VerifyError::FactoryNotAllowed {
                    factory: wrapped.factory,
                });
            }
        }
        let payer = checked.exact.authorization.from;
        match checker
            .is_valid(chain_id, payer, checked.digest, signature)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(VerifyError::ContractSignature { payer }),
            Err(e) if e.is_unsupported_chain() => Err(in_process),
            Err(e) => Err(VerifyError::Unavailable {
                retry_after: None,
                source: Box::new(e),
            }),
        }
    }
}

/// The signature recovers to `from`: an EOA's (or an EIP-7702 account's key) payment.
fn eoa(checked: &Checked) -> Result<(), VerifyError> {
    let from = checked.exact.authorization.from;
    let recovered = recover_signer_kept(checked.digest, &checked.exact.signature)?;
    if recovered != from {
        return Err(VerifyError::WrongSigner {
            recovered,
            expected: from,
        });
    }
    Ok(())
}

fn accept(
    payload: &PaymentPayload,
    req: &PaymentRequirements,
    checked: Checked,
) -> VerifiedPayment {
    let mut verified = VerifiedPayment::exact(
        payload.version(),
        req.network,
        req.asset.evm().unwrap_or_default(),
        checked.exact.authorization,
        checked.exact.signature,
    );
    // In range (checked above); the rest are the authorization's, equal to `req`'s.
    verified.valid_before = checked.valid_before;
    verified
}

#[async_trait::async_trait]
impl super::Verifier for ExactEvmVerifier {
    async fn verify(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        self.verify_unboxed(payload, req).await
    }

    fn verify_now(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Option<Result<VerifiedPayment, VerifyError>> {
        (!self.asks_chain()).then(|| self.verify_sync(payload, req))
    }
}

impl ExactEvmVerifier {
    /// Whether a signature that does not recover to `from` goes to the chain (a checker is
    /// configured): otherwise [`Self::verify_sync`] is the whole of `verify`.
    pub(super) fn asks_chain(&self) -> bool {
        self.wallets.is_some()
    }

    /// [`Verifier::verify`](super::Verifier::verify) as a plain future: [`super::EvmVerifier`]
    /// awaits it inside its own boxed future instead of boxing a second one.
    pub(super) async fn verify_unboxed(
        &self,
        payload: &PaymentPayload,
        req: &PaymentRequirements,
    ) -> Result<VerifiedPayment, VerifyError> {
        let checked = self.check(payload, req)?;
        if let Err(in_process) = eoa(&checked) {
            let Some(checker) = &self.wallets else {
                return Err(in_process);
            };
            self.contract(&**checker, req.network.chain_id(), &checked, in_process)
                .await?;
            let mut verified = accept(payload, req, checked);
            verified.signer = super::wallet::SignerKind::Contract;
            return Ok(verified);
        }
        Ok(accept(payload, req, checked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::{address, b256, hex};
    use alloy_sol_types::SolStruct;

    #[test]
    fn kept_addresses_are_the_recovered_ones() {
        use secp256k1::{PublicKey, SECP256K1, SecretKey};
        ADDRESSES.with_borrow_mut(|kept| kept.clear());
        let digest = B256::repeat_byte(0x42);
        let sign = |key: &SecretKey| {
            let (recid, rs) = SECP256K1
                .sign_ecdsa_recoverable(Message::from_digest(digest.0), key)
                .serialize_compact();
            let mut sig = rs.to_vec();
            sig.push(27 + i32::from(recid) as u8);
            sig
        };
        // More signers than slots, each twice in a row, all of them twice over: hits, misses
        // and replaced slots.
        let keys: Vec<SecretKey> = (1..=12u8)
            .map(|i| SecretKey::from_byte_array([i; 32]).expect("key"))
            .collect();
        for _ in 0..2 {
            for key in &keys {
                let point = PublicKey::from_secret_key(SECP256K1, key).serialize_uncompressed();
                let address = Address::from_slice(&keccak256(&point[1..])[12..]);
                for _ in 0..2 {
                    let sig = sign(key);
                    assert_eq!(recover_signer_kept(digest, &sig), Ok(address));
                    assert_eq!(recover_signer(digest, &sig), Ok(address));
                }
            }
        }
        assert_eq!(ADDRESSES.with_borrow(|kept| kept.len()), 8);
        // Refusals are the plain recovery's.
        let sig = sign(&keys[0]);
        assert_eq!(
            recover_signer_kept(digest, &sig[..64]),
            Err(SignatureError::Length(64))
        );
        let mut high_v = sig.clone();
        high_v[64] = 29;
        assert_eq!(
            recover_signer_kept(digest, &high_v),
            Err(SignatureError::V(29))
        );
    }

    // The signed example of the x402 spec (checked in the protocol digest, §3.2).
    fn spec_auth() -> Authorization {
        Authorization {
            from: address!("0x857b06519E91e3A54538791bDbb0E22373e36b66"),
            to: address!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            value: U256::from(10_000),
            valid_after: U256::from(1_740_672_089_u64),
            valid_before: U256::from(1_740_672_154_u64),
            nonce: b256!("0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"),
        }
    }
    const SPEC_SIG: [u8; 65] = hex!(
        "2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c"
    );

    #[test]
    fn spec_vector() {
        let sep = domain_separator(
            "USDC",
            "2",
            84532,
            address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        );
        assert_eq!(
            sep,
            b256!("0x71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818")
        );
        assert_eq!(
            struct_hash(&spec_auth()),
            b256!("0x49ad644555c7bdf3ea4fc022a4940ae5589b230b1dde0065c5504fa19bbe39a4")
        );
        let digest = signing_hash(sep, &spec_auth());
        assert_eq!(
            digest,
            b256!("0xf256992871671abcb27ff92885a7afa46218724e5fc0bac35d050115aa1d22e6")
        );
        assert_eq!(recover_signer(digest, &SPEC_SIG), Ok(spec_auth().from));
        let mainnet = domain_separator(
            "USD Coin",
            "2",
            8453,
            address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
        );
        assert_eq!(
            mainnet,
            b256!("0x02fa7265e7c5d81118673727957699e4d68f74cd74b7db77da710fe8a2c7834f")
        );
    }

    #[test]
    fn struct_hash_matches_sol_macro() {
        let mut auth = spec_auth();
        for value in [U256::ZERO, U256::from(1), U256::MAX] {
            auth.value = value;
            auth.nonce = B256::repeat_byte(0xff);
            let sol = TransferWithAuthorization::from(&auth);
            assert_eq!(struct_hash(&auth), sol.eip712_hash_struct());
            assert_eq!(sol.eip712_type_hash(), TRANSFER_WITH_AUTHORIZATION_TYPEHASH);
        }
    }

    #[test]
    fn kept_first_blocks_hash_as_the_whole() {
        // More first blocks than a thread keeps, each met again after others replaced it,
        // with the second block changing every time: always the sol! struct's hash.
        let mut auth = spec_auth();
        for round in 0u8..3 {
            for payer in 0u8..(FirstBlocks::SLOTS as u8 + 5) {
                auth.from = Address::repeat_byte(payer);
                auth.value = U256::from(payer % 3);
                // The top bytes of validAfter sit in the first block, the rest in the second.
                auth.valid_after = U256::from(round) << 192 | U256::from(payer);
                auth.valid_before = U256::from(1_000 + u64::from(round));
                auth.nonce = B256::repeat_byte(round ^ payer);
                let sol = TransferWithAuthorization::from(&auth);
                assert_eq!(
                    struct_hash(&auth),
                    sol.eip712_hash_struct(),
                    "{round} {payer}"
                );
            }
        }
    }

    #[test]
    fn signature_rules() {
        let digest = signing_hash(
            domain_separator(
                "USDC",
                "2",
                84532,
                address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            ),
            &spec_auth(),
        );
        let mut v0 = SPEC_SIG;
        v0[64] = 1;
        assert_eq!(recover_signer(digest, &v0), Err(SignatureError::V(1)));
        assert_eq!(
            recover_signer(digest, &SPEC_SIG[..64]),
            Err(SignatureError::Length(64))
        );
        // The malleable twin (n - s, flipped v) recovers the same key off-chain but not on USDC.
        let n = U256::from_be_bytes(hex!(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"
        ));
        let s = U256::from_be_slice(&SPEC_SIG[32..64]);
        let mut high = SPEC_SIG;
        high[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
        high[64] = 27;
        assert_eq!(recover_signer(digest, &high), Err(SignatureError::HighS));
        assert_eq!(
            recover_signer(
                digest,
                &[0u8; 65][..64]
                    .iter()
                    .chain(&[27])
                    .copied()
                    .collect::<Vec<_>>()
            ),
            Err(SignatureError::Invalid)
        );
    }
}
