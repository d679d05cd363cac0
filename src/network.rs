//! Chains (CAIP-2 `eip155:<id>` and the known `solana:<genesis>` clusters, with the v1 short
//! names) and token presets.

use std::fmt;
use std::str::FromStr;

use alloy_primitives::{Address, address};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A network: an EVM chain, identified by its chain id, or a known Solana cluster.
///
/// On the wire it is CAIP-2 (`eip155:84532`) in x402 v2 and a short name (`base-sepolia`) in v1.
/// [`FromStr`] accepts both; [`Network::caip2`] and [`Network::v1_name`] render them.
///
/// ```
/// use tower_x402::Network;
/// let n: Network = "base-sepolia".parse().unwrap();
/// assert_eq!(n, Network::BASE_SEPOLIA);
/// assert_eq!(n.to_string(), "eip155:84532");
/// assert_eq!("eip155:8453".parse::<Network>().unwrap().v1_name(), Some("base"));
/// ```
///
/// Solana clusters (`solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp`, v1 `solana`) are kept in the
/// same `u64`, above every valid EIP-155 id ([`Network::is_solana`]): `Network` stays `Copy`
/// and the replay keys and bound challenges of EVM networks keep their bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Network {
    chain_id: u64,
}

/// Solana clusters live at `SOLANA_TAG | n`: EIP-155 ids above 2^63 are not valid (EIP-2294
/// bounds them far lower) and `from_caip2` refuses them, so no EVM network can collide.
const SOLANA_TAG: u64 = 1 << 63;

/// The Solana clusters we know: CAIP-2 reference (the genesis hash's first 32 base58
/// characters, as the reference SDKs write it), v1 name, and our id.
const SOLANA_CLUSTERS: &[(&str, Option<&str>, u64)] = &[
    (
        "5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
        Some("solana"),
        SOLANA_TAG | 1,
    ),
    (
        "EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
        Some("solana-devnet"),
        SOLANA_TAG | 2,
    ),
    (
        "4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z",
        Some("solana-testnet"),
        SOLANA_TAG | 3,
    ),
    // The local test chain (tests/svm/chain.mjs); not a real cluster.
    ("x402LocalTestChain11111111111111", None, SOLANA_TAG | 4),
];

/// v1 short names and their chain ids (the reference's table, EVM part).
const V1_NAMES: &[(&str, u64)] = &[
    ("base", 8453),
    ("base-sepolia", 84532),
    ("avalanche", 43114),
    ("avalanche-fuji", 43113),
    ("polygon", 137),
    ("polygon-amoy", 80002),
    ("sei", 1329),
    ("sei-testnet", 1328),
    ("iotex", 4689),
    ("ethereum", 1),
    ("sepolia", 11155111),
    ("arbitrum", 42161),
    ("arbitrum-sepolia", 421614),
    ("optimism", 10),
    ("optimism-sepolia", 11155420),
];

impl Network {
    /// Base mainnet, `eip155:8453`.
    pub const BASE: Network = Network::eip155(8453);
    /// Base Sepolia testnet, `eip155:84532`.
    pub const BASE_SEPOLIA: Network = Network::eip155(84532);

    /// Solana mainnet-beta, `solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp` (v1 `solana`).
    pub const SOLANA: Network = Network {
        chain_id: SOLANA_TAG | 1,
    };
    /// Solana devnet, `solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1` (v1 `solana-devnet`).
    pub const SOLANA_DEVNET: Network = Network {
        chain_id: SOLANA_TAG | 2,
    };
    /// Solana testnet, `solana:4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z` (v1 `solana-testnet`).
    pub const SOLANA_TESTNET: Network = Network {
        chain_id: SOLANA_TAG | 3,
    };
    /// A local Solana test chain, `solana:x402LocalTestChain11111111111111` (no v1 name).
    pub const SOLANA_LOCAL: Network = Network {
        chain_id: SOLANA_TAG | 4,
    };

    /// The EVM network with this chain id (below 2^63, as EIP-155 ids are).
    pub const fn eip155(chain_id: u64) -> Self {
        Self { chain_id }
    }

    /// The EIP-155 chain id (the EIP-712 `chainId`); for a Solana cluster, its id in this
    /// crate (at or above 2^63, never a valid EIP-155 id).
    pub const fn chain_id(self) -> u64 {
        self.chain_id
    }

    /// True for a Solana cluster.
    pub const fn is_solana(self) -> bool {
        self.chain_id & SOLANA_TAG != 0
    }

    /// The Solana cluster's CAIP-2 reference and v1 name.
    fn solana(self) -> Option<(&'static str, Option<&'static str>)> {
        SOLANA_CLUSTERS
            .iter()
            .find(|(_, _, id)| *id == self.chain_id)
            .map(|(reference, v1, _)| (*reference, *v1))
    }

    /// CAIP-2 id, e.g. `eip155:8453` (the v2 wire form).
    pub fn caip2(self) -> String {
        self.to_string()
    }

    /// The v1 short name, if the chain has one.
    pub fn v1_name(self) -> Option<&'static str> {
        if self.is_solana() {
            return self.solana().and_then(|(_, v1)| v1);
        }
        V1_NAMES
            .iter()
            .find(|(_, id)| *id == self.chain_id)
            .map(|(name, _)| *name)
    }

    /// Parses a CAIP-2 `eip155:<decimal chain id>` or a known `solana:<reference>`.
    pub fn from_caip2(s: &str) -> Result<Self, NetworkParseError> {
        if let Some(reference) = s.strip_prefix("solana:") {
            return SOLANA_CLUSTERS
                .iter()
                .find(|(r, _, _)| *r == reference)
                .map(|(_, _, id)| Self { chain_id: *id })
                .ok_or(NetworkParseError::Unsupported);
        }
        let id = s
            .strip_prefix("eip155:")
            .ok_or(NetworkParseError::Unsupported)?;
        // Canonical decimal only: no sign, no leading zeros, fits u64.
        if id.is_empty()
            || !id.bytes().all(|b| b.is_ascii_digit())
            || (id.len() > 1 && id.starts_with('0'))
        {
            return Err(NetworkParseError::Malformed);
        }
        match id.parse::<u64>() {
            Ok(id) if id & SOLANA_TAG == 0 => Ok(Self::eip155(id)),
            _ => Err(NetworkParseError::Malformed),
        }
    }

    /// Parses a v1 short name such as `base-sepolia` or `solana-devnet`.
    pub fn from_v1_name(s: &str) -> Result<Self, NetworkParseError> {
        V1_NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, id)| Self::eip155(*id))
            .or_else(|| {
                SOLANA_CLUSTERS
                    .iter()
                    .find(|(_, v1, _)| *v1 == Some(s))
                    .map(|(_, _, id)| Self { chain_id: *id })
            })
            .ok_or(NetworkParseError::Unsupported)
    }
}

/// Why a network string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkParseError {
    /// Not a network we know (another CAIP-2 namespace, an unknown Solana cluster, or an
    /// unknown v1 name).
    #[error("unsupported network")]
    Unsupported,
    /// `eip155:` followed by something that is not a canonical decimal chain id.
    #[error("malformed eip155 chain id")]
    Malformed,
}

impl FromStr for Network {
    type Err = NetworkParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Self::from_caip2(s)
        } else {
            Self::from_v1_name(s)
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.solana() {
            Some((reference, _)) => write!(f, "solana:{reference}"),
            None => write!(f, "eip155:{}", self.chain_id),
        }
    }
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Serializes as CAIP-2 (the v2 form); v1 types use [`v1_name`] instead.
impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_str(d, Network::from_caip2)
    }
}

/// Reads a string with `parse`, borrowing it: `Cow<str>` would copy it into a `String`.
fn read_str<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<Network, NetworkParseError>,
) -> Result<Network, D::Error> {
    struct Text(fn(&str) -> Result<Network, NetworkParseError>);
    impl serde::de::Visitor<'_> for Text {
        type Value = Network;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Network, E> {
            (self.0)(s).map_err(E::custom)
        }
        fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Network, E> {
            let s = std::str::from_utf8(b)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(b), &self))?;
            self.visit_str(s)
        }
    }
    d.deserialize_str(Text(parse))
}

/// Serde adapter for the v1 short network names (`base`, `base-sepolia`, ...).
pub mod v1_name {
    use super::Network;
    use serde::{Deserializer, Serializer};

    /// Writes the short name; a chain without one is written as CAIP-2.
    pub fn serialize<S: Serializer>(n: &Network, s: S) -> Result<S::Ok, S::Error> {
        match n.v1_name() {
            Some(name) => s.serialize_str(name),
            None => s.collect_str(n),
        }
    }

    /// Reads a short name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
        super::read_str(d, Network::from_v1_name)
    }
}

/// An EIP-3009 token: where it lives and the EIP-712 domain it signs with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Asset {
    /// The network the token contract is deployed on.
    pub network: Network,
    /// The token contract (the EIP-712 `verifyingContract`).
    pub address: Address,
    /// EIP-712 domain `name` (the contract's `name()`).
    pub eip712_name: String,
    /// EIP-712 domain `version` (the contract's `version()`).
    pub eip712_version: String,
    /// Decimals used to turn a `$` price into atomic units.
    pub decimals: u8,
}

impl Asset {
    /// USDC on Base mainnet. Note the domain name `USD Coin` (Sepolia's is `USDC`).
    pub fn usdc_base() -> Self {
        Self {
            network: Network::BASE,
            address: address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
            eip712_name: "USD Coin".into(),
            eip712_version: "2".into(),
            decimals: 6,
        }
    }

    /// USDC on Base Sepolia.
    pub fn usdc_base_sepolia() -> Self {
        Self {
            network: Network::BASE_SEPOLIA,
            address: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            eip712_name: "USDC".into(),
            eip712_version: "2".into(),
            decimals: 6,
        }
    }

    /// The USDC preset for `network`, if we ship one.
    pub fn usdc(network: Network) -> Option<Self> {
        match network {
            Network::BASE => Some(Self::usdc_base()),
            Network::BASE_SEPOLIA => Some(Self::usdc_base_sepolia()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!("eip155:8453".parse::<Network>(), Ok(Network::BASE));
        assert_eq!("base".parse::<Network>(), Ok(Network::BASE));
        assert_eq!(Network::BASE_SEPOLIA.caip2(), "eip155:84532");
        assert_eq!(Network::BASE_SEPOLIA.v1_name(), Some("base-sepolia"));
    }

    #[test]
    fn solana_clusters_round_trip() {
        for (n, caip2, v1) in [
            (
                Network::SOLANA,
                "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
                Some("solana"),
            ),
            (
                Network::SOLANA_DEVNET,
                "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
                Some("solana-devnet"),
            ),
            (
                Network::SOLANA_LOCAL,
                "solana:x402LocalTestChain11111111111111",
                None,
            ),
        ] {
            assert!(n.is_solana() && !Network::BASE.is_solana());
            assert_eq!(n.caip2(), caip2);
            assert_eq!(caip2.parse::<Network>(), Ok(n));
            assert_eq!(n.v1_name(), v1);
            if let Some(v1) = v1 {
                assert_eq!(v1.parse::<Network>(), Ok(n));
            }
        }
    }

    #[test]
    fn refuses_odd_forms() {
        for bad in [
            "eip155:",
            "eip155:+1",
            "eip155:01",
            "eip155:0x2105",
            "eip155:99999999999999999999999",
            "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvd",
            "solana:",
            "eip155:9223372036854775809",
            "Base",
            "",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }
}
