//! [`LocalAuthorizer`]: the server's receiver-authorizer key held in process.
//!
//! The escrow accepts a `claimWithSignature` or a `refundWithSignature` only with a signature
//! of the channel's `receiverAuthorizer`: the address a route advertises in
//! `extra.receiverAuthorizer`. A seller who keeps that key in a KMS implements
//! [`ReceiverAuthorizer`] over it; one who keeps it in a secret store or an environment
//! variable uses this type. It signs with libsecp256k1 (the library the verifier recovers
//! with), so it needs no feature and no alloy signer.

use alloy_primitives::{Address, B256, Bytes, keccak256};
use secp256k1::ecdsa::RecoveryId;
use secp256k1::{Message, PublicKey, SECP256K1, SecretKey};

use super::ReceiverAuthorizer;

/// Why a receiver-authorizer key could not be made. Never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorizerKeyError {
    /// The environment variable is not set (or not unicode).
    #[error(
        "environment variable {0} is not set: set it to the receiver authorizer's private key (64 hex digits)"
    )]
    NotSet(&'static str),
    /// Not 32 bytes written as 64 hex digits (an optional `0x` allowed).
    #[error("{0}: a private key must be 32 bytes written as 64 hex digits")]
    Malformed(&'static str),
    /// 32 bytes, but not a secp256k1 private key: zero, or not below the curve order.
    #[error("{0}: not a secp256k1 private key (zero, or not below the curve order)")]
    OutOfRange(&'static str),
    /// The operating system's random source failed.
    #[error("the OS random source failed; cannot make a key")]
    NoRandomness,
}

impl AuthorizerKeyError {
    /// True when the environment variable is simply absent.
    pub fn is_not_set(&self) -> bool {
        matches!(self, Self::NotSet(_))
    }

    /// True when a key was given but is not one: bad hex or length, or out of range.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::Malformed(_) | Self::OutOfRange(_))
    }
}

/// A [`ReceiverAuthorizer`] holding a secp256k1 private key in process: signs the
/// `ClaimBatch` and `Refund` digests as the escrow expects, 65 bytes `r ‖ s ‖ v` with
/// `v ∈ {27, 28}` and a low `s`.
///
/// Its `Debug` shows the address only. Dropping it overwrites the key (best effort: a move
/// may leave copies the compiler made). `Clone` it to give the same key to
/// [`Channels::with_authorizer`](super::serve::Channels::with_authorizer) and to the
/// channel manager.
///
/// ```
/// use tower_x402::channel::{self, LocalAuthorizer, ReceiverAuthorizer as _};
/// use tower_x402::primitives::{B256, U256, address};
/// use tower_x402::verify::exact::recover_signer;
///
/// # fn main() -> Result<(), tower_x402::store::BoxError> {
/// // In production: `LocalAuthorizer::from_env()?` (X402_RECEIVER_AUTHORIZER_KEY).
/// let authorizer =
///     LocalAuthorizer::from_hex("0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba")?;
/// // What the batch-settlement option advertises as `extra.receiverAuthorizer`.
/// assert_eq!(authorizer.address(), address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"));
///
/// // The cooperative refund of 500 units of a channel, as the escrow checks it.
/// let digest = channel::refund_digest(84532, B256::repeat_byte(7), U256::ZERO, 500);
/// let signature = authorizer.sign_digest(digest)?;
/// assert_eq!(recover_signer(digest, &signature)?, authorizer.address());
/// assert!(format!("{authorizer:?}").contains("0x9965"), "Debug shows the address, not the key");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LocalAuthorizer {
    key: SecretKey,
    address: Address,
}

impl LocalAuthorizer {
    /// The environment variable [`LocalAuthorizer::from_env`] reads.
    pub const ENV_KEY: &'static str = "X402_RECEIVER_AUTHORIZER_KEY";

    /// The key of these 32 bytes.
    ///
    /// # Errors
    /// [`AuthorizerKeyError::OutOfRange`] for zero or a value not below the curve order.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, AuthorizerKeyError> {
        Self::named(bytes, "receiver authorizer key")
    }

    /// A key written as 64 hex digits (an optional `0x` prefix; surrounding whitespace
    /// ignored), as kept in a secret store.
    ///
    /// # Errors
    /// [`AuthorizerKeyError::Malformed`] unless it is exactly 32 bytes of hex;
    /// [`AuthorizerKeyError::OutOfRange`] as [`LocalAuthorizer::from_bytes`].
    pub fn from_hex(hex: &str) -> Result<Self, AuthorizerKeyError> {
        Self::parse(hex, "receiver authorizer key")
    }

    /// The key in the environment variable [`ENV_KEY`](Self::ENV_KEY)
    /// (`X402_RECEIVER_AUTHORIZER_KEY`), 64 hex digits.
    ///
    /// # Errors
    /// [`AuthorizerKeyError::NotSet`] without it; otherwise as [`LocalAuthorizer::from_hex`].
    pub fn from_env() -> Result<Self, AuthorizerKeyError> {
        Self::from_var(std::env::var(Self::ENV_KEY))
    }

    /// A fresh random key (a demo, a benchmark: no channel can name it after a restart).
    ///
    /// # Errors
    /// [`AuthorizerKeyError::NoRandomness`] if the OS random source fails.
    pub fn random() -> Result<Self, AuthorizerKeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| AuthorizerKeyError::NoRandomness)?;
        Self::from_bytes(bytes)
    }

    /// The authorizer's address: the channels' `receiverAuthorizer`, the option's
    /// `extra.receiverAuthorizer`.
    pub fn address(&self) -> Address {
        self.address
    }

    fn from_var(value: Result<String, std::env::VarError>) -> Result<Self, AuthorizerKeyError> {
        let value = value.map_err(|_| AuthorizerKeyError::NotSet(Self::ENV_KEY))?;
        let parsed = Self::parse(&value, Self::ENV_KEY);
        erase(&mut value.into_bytes());
        parsed
    }

    fn parse(text: &str, what: &'static str) -> Result<Self, AuthorizerKeyError> {
        let mut bytes =
            crate::challenge::secret_from_hex(text).ok_or(AuthorizerKeyError::Malformed(what))?;
        let key = Self::named(bytes, what);
        erase(&mut bytes);
        key
    }

    fn named(mut bytes: [u8; 32], what: &'static str) -> Result<Self, AuthorizerKeyError> {
        let key = SecretKey::from_byte_array(bytes);
        erase(&mut bytes);
        let key = key.map_err(|_| AuthorizerKeyError::OutOfRange(what))?;
        let public = PublicKey::from_secret_key_global(&key).serialize_uncompressed();
        Ok(Self {
            key,
            address: Address::from_slice(&keccak256(&public[1..])[12..]),
        })
    }
}

impl ReceiverAuthorizer for LocalAuthorizer {
    fn sign_digest(&self, digest: B256) -> Result<Bytes, crate::store::BoxError> {
        let signature = SECP256K1.sign_ecdsa_recoverable(Message::from_digest(digest.0), &self.key);
        let (id, rs) = signature.serialize_compact();
        // libsecp256k1 gives a low `s`; ids 2 and 3 (r above the order, about 2^-127) have no
        // `v` that `ecrecover` reads.
        let v = match id {
            RecoveryId::Zero => 27,
            RecoveryId::One => 28,
            _ => return Err("signature recovery id above 1: no ecrecover v".into()),
        };
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&rs);
        out[64] = v;
        Ok(Bytes::copy_from_slice(&out))
    }
}

impl std::fmt::Debug for LocalAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuthorizer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Drop for LocalAuthorizer {
    fn drop(&mut self) {
        self.key.non_secure_erase();
    }
}

/// Overwrites a copy of key material; `black_box` keeps the writes from being dropped as dead.
fn erase(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::exact::recover_signer;

    /// Anvil #5 and its address.
    const KEY: &str = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";
    const ADDRESS: Address =
        alloy_primitives::address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");
    /// The secp256k1 group order n.
    const ORDER: &str = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141";

    fn digests() -> impl Iterator<Item = B256> {
        (0u8..32).map(|i| keccak256([i]))
    }

    /// Every signature recovers to `address()` under the rules USDC and the escrow enforce
    /// (65 bytes, v 27/28, low s), and both values of v occur.
    #[test]
    fn signatures_recover_to_the_address_with_v_27_or_28() {
        let authorizer = LocalAuthorizer::from_hex(KEY).unwrap();
        assert_eq!(authorizer.address(), ADDRESS);
        let mut vs = std::collections::BTreeSet::new();
        for digest in digests() {
            let signature = authorizer.sign_digest(digest).unwrap();
            assert_eq!(recover_signer(digest, &signature).unwrap(), ADDRESS);
            vs.insert(signature[64]);
        }
        assert_eq!(vs.into_iter().collect::<Vec<_>>(), [27, 28]);
    }

    /// The same bytes as alloy's local signer (what the tests' and examples' authorizers
    /// returned before): both are RFC 6979 with a normalized s.
    #[test]
    fn signatures_are_alloys() {
        use alloy_signer::SignerSync as _;
        let alloy: alloy_signer_local::PrivateKeySigner = KEY.parse().unwrap();
        let authorizer = LocalAuthorizer::from_bytes(alloy.to_bytes().0).unwrap();
        for digest in digests() {
            let expected = alloy.sign_hash_sync(&digest).unwrap().as_bytes();
            assert_eq!(authorizer.sign_digest(digest).unwrap()[..], expected[..]);
        }
    }

    /// Hex with or without `0x`, with whitespace; malformed and out-of-range keys refused
    /// with their error, the key never in the message.
    #[test]
    fn keys_are_parsed_strictly() {
        let padded = format!("  {}\n", KEY.trim_start_matches("0x"));
        assert_eq!(
            LocalAuthorizer::from_hex(&padded).unwrap().address(),
            ADDRESS
        );
        let below_order = format!("{}40", &ORDER[..62]);
        assert!(LocalAuthorizer::from_hex(&below_order).is_ok());
        let what = "receiver authorizer key";
        for (input, expected) in [
            ("", AuthorizerKeyError::Malformed(what)),
            ("0x", AuthorizerKeyError::Malformed(what)),
            (&KEY[..64], AuthorizerKeyError::Malformed(what)),
            (&format!("{KEY}00"), AuthorizerKeyError::Malformed(what)),
            (&KEY.replace('f', "g"), AuthorizerKeyError::Malformed(what)),
            (&"0".repeat(64), AuthorizerKeyError::OutOfRange(what)),
            (ORDER, AuthorizerKeyError::OutOfRange(what)),
            (&"f".repeat(64), AuthorizerKeyError::OutOfRange(what)),
        ] {
            let error = LocalAuthorizer::from_hex(input).unwrap_err();
            assert_eq!(error, expected, "{input:?}");
            assert!(error.is_malformed() && !error.is_not_set(), "{input:?}");
            assert!(!error.to_string().contains(&KEY[2..10]));
        }
        assert_eq!(
            LocalAuthorizer::from_bytes([0; 32]).unwrap_err(),
            AuthorizerKeyError::OutOfRange(what)
        );
    }

    /// The environment variable: absent, malformed (named in the error), valid.
    #[test]
    fn the_environment_variable_is_named_in_its_errors() {
        let var = LocalAuthorizer::ENV_KEY;
        let absent = LocalAuthorizer::from_var(Err(std::env::VarError::NotPresent)).unwrap_err();
        assert!(absent.is_not_set() && !absent.is_malformed());
        assert!(absent.to_string().contains(var));
        let bad = LocalAuthorizer::from_var(Ok("0x1234".into())).unwrap_err();
        assert_eq!(bad, AuthorizerKeyError::Malformed(var));
        let ok = LocalAuthorizer::from_var(Ok(KEY.into())).unwrap();
        assert_eq!(ok.address(), ADDRESS);
    }

    /// `Debug` names the address and never the key; clones sign alike; random keys differ.
    #[test]
    fn debug_hides_the_key() {
        let authorizer = LocalAuthorizer::from_hex(KEY).unwrap();
        let debug = format!("{authorizer:?}");
        let address = ADDRESS.to_string().to_lowercase();
        assert!(debug.to_lowercase().contains(&address), "{debug}");
        assert!(!debug.to_lowercase().contains(&KEY[2..18]), "{debug}");
        let digest = B256::repeat_byte(1);
        assert_eq!(
            authorizer.clone().sign_digest(digest).unwrap(),
            authorizer.sign_digest(digest).unwrap()
        );
        let (a, b) = (
            LocalAuthorizer::random().unwrap(),
            LocalAuthorizer::random().unwrap(),
        );
        assert_ne!(a.address(), b.address());
    }
}
