//! The `batch-settlement` EVM payloads (x402 `scheme_batch_settlement_evm`; what `@x402/evm`
//! 2.27's `BatchSettlementEvmScheme` sends): a `deposit` (token authorization + first voucher),
//! a `voucher` (the next cumulative ceiling) or a `refund` (a zero-charge voucher asking for
//! the unclaimed escrow back), each with the channel's full config.

use alloy_primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};

/// The channel's immutable config; its EIP-712 hash is the channel id
/// ([`crate::channel::channel_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelConfig {
    /// The client's wallet, whose tokens fund the channel.
    #[serde(serialize_with = "super::checksummed")]
    pub payer: Address,
    /// The EOA that signs vouchers, or zero: the payer signs them (EIP-1271 for a contract).
    #[serde(serialize_with = "super::checksummed")]
    pub payer_authorizer: Address,
    /// Where claimed funds go: the requirement's `payTo`.
    #[serde(serialize_with = "super::checksummed")]
    pub receiver: Address,
    /// Signs claims and refunds: the requirement's `extra.receiverAuthorizer`.
    #[serde(serialize_with = "super::checksummed")]
    pub receiver_authorizer: Address,
    /// The ERC-20 token: the requirement's `asset`.
    #[serde(serialize_with = "super::checksummed")]
    pub token: Address,
    /// Seconds a timed withdrawal waits (`uint40` on chain; 15 min to 30 days).
    pub withdraw_delay: u64,
    /// Tells apart channels that share every other field.
    pub salt: B256,
}

/// A signed cumulative ceiling: the receiver may claim up to `max_claimable_amount` in total
/// from the channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Voucher {
    /// The channel the voucher is for (must be the config's hash).
    pub channel_id: B256,
    /// Cumulative ceiling, in atomic units (`uint128` on chain).
    #[serde(with = "super::decimal")]
    pub max_claimable_amount: U256,
    /// EIP-712 `Voucher` signature of the payer authorizer (or the payer).
    pub signature: Bytes,
}

/// The EIP-3009 `receiveWithAuthorization` of a deposit; the signed `to` is the ERC-3009
/// deposit collector and the nonce is `keccak256(abi.encode(channelId, salt))`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Erc3009Authorization {
    /// Unix seconds after which it is valid.
    #[serde(with = "super::decimal")]
    pub valid_after: U256,
    /// Unix seconds before which it must be used.
    #[serde(with = "super::decimal")]
    pub valid_before: U256,
    /// The client's random salt (a 32-byte hex string, read as a `uint256`).
    pub salt: B256,
    /// EIP-712 signature of the payer.
    pub signature: Bytes,
}

/// How the deposit is authorized: exactly one method.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DepositAuthorization {
    /// EIP-3009 (`assetTransferMethod: "eip3009"`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erc3009_authorization: Option<Erc3009Authorization>,
    /// Permit2 (`assetTransferMethod: "permit2"`); boxed, as it is the larger and rarer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit2_authorization: Option<Box<Permit2DepositAuthorization>>,
}

/// The witness of a Permit2 deposit: the channel the permit may fund.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DepositWitness {
    /// The channel id (the config's EIP-712 hash).
    pub channel_id: B256,
}

/// The Permit2 `PermitWitnessTransferFrom` of a deposit (`permit2Authorization`): spender = the
/// Permit2 deposit collector, the deposit amount, the witness `DepositWitness(channelId)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permit2DepositAuthorization {
    /// The payer, and the expected signer (not part of the signed message).
    #[serde(serialize_with = "super::checksummed")]
    pub from: Address,
    /// Token and amount: the channel's token, the deposit amount.
    pub permitted: super::upto::TokenPermissions,
    /// Who may pull the tokens: the Permit2 deposit collector.
    #[serde(serialize_with = "super::checksummed")]
    pub spender: Address,
    /// Permit2 unordered nonce.
    #[serde(with = "super::decimal")]
    pub nonce: U256,
    /// Unix seconds after which the permit is void.
    #[serde(with = "super::decimal")]
    pub deadline: U256,
    /// The channel the permit funds.
    pub witness: DepositWitness,
    /// EIP-712 signature of the payer over Permit2's domain.
    pub signature: Bytes,
}

/// The deposit part of a `deposit` payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deposit {
    /// Atomic units moved into the escrow.
    #[serde(with = "super::decimal")]
    pub amount: U256,
    /// The token authorization.
    pub authorization: DepositAuthorization,
}

/// `payload` of a `batch-settlement` EVM payment, by its `type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum BatchEvmPayload {
    /// Opens or tops up the channel and pays this request with `voucher`.
    #[serde(rename_all = "camelCase")]
    Deposit {
        /// The channel.
        channel_config: ChannelConfig,
        /// The voucher for this request.
        voucher: Voucher,
        /// The token authorization.
        deposit: Deposit,
    },
    /// Pays this request from the channel's balance.
    #[serde(rename_all = "camelCase")]
    Voucher {
        /// The channel.
        channel_config: ChannelConfig,
        /// The voucher for this request.
        voucher: Voucher,
    },
    /// Asks for the unclaimed escrow back (all of it without `amount`); the handler is not
    /// run.
    #[serde(rename_all = "camelCase")]
    Refund {
        /// The channel.
        channel_config: ChannelConfig,
        /// A zero-charge voucher: its ceiling is the charged cumulative amount.
        voucher: Voucher,
        /// A partial refund, in atomic units.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal")]
        amount: Option<U256>,
    },
}

impl BatchEvmPayload {
    /// The channel config every payload carries.
    pub fn channel_config(&self) -> &ChannelConfig {
        match self {
            Self::Deposit { channel_config, .. }
            | Self::Voucher { channel_config, .. }
            | Self::Refund { channel_config, .. } => channel_config,
        }
    }

    /// The voucher every payload carries.
    pub fn voucher(&self) -> &Voucher {
        match self {
            Self::Deposit { voucher, .. }
            | Self::Voucher { voucher, .. }
            | Self::Refund { voucher, .. } => voucher,
        }
    }
}

impl BatchEvmPayload {
    /// Parses a raw `payload` object as `serde_json::from_str` does, with the same result for
    /// every input. A `voucher` payload in the compact form clients send (no whitespace, no
    /// escapes, each field once) takes a direct path: serde's internally tagged enum buffers
    /// the whole object into an intermediate tree before it can read the `type`. Anything
    /// else, `deposit` and `refund` payloads and errors included, goes through serde.
    pub(crate) fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        super::compact::or_serde(json, compact::payload)
    }
}

/// The compact `voucher` payload at `c` (see [`compact`]), for a document that embeds one (the
/// header decoder reads a proof's `payload` with it, so the channel path parses nothing again).
pub(super) fn read_compact(c: &mut super::compact::Cursor<'_>) -> Option<BatchEvmPayload> {
    compact::object(c)
}

/// The direct path of [`BatchEvmPayload::from_json`], for `voucher` payloads only (one per
/// paid request; a deposit or refund is rare). Values are read by the functions serde's
/// visitors call (`FromHex`, `hex::decode`, [`super::decimal::parse`]); anything it does not
/// expect (whitespace, escapes, another `type`, other keys, a repeated or missing field,
/// trailing text) is `None`, left to serde (`tests::compact_path_agrees_with_serde`).
mod compact {
    use alloy_primitives::hex::{self, FromHex};
    use alloy_primitives::map::HashMap;

    use super::super::compact::{Cursor, once};
    use super::{BatchEvmPayload, ChannelConfig, Voucher};

    pub(super) fn payload(text: &str) -> Option<BatchEvmPayload> {
        let mut c = Cursor::new(text);
        let batch = object(&mut c)?;
        c.done().then_some(batch)
    }

    /// The object at the cursor, which is left after it.
    pub(in crate::proto) fn object(c: &mut Cursor<'_>) -> Option<BatchEvmPayload> {
        let (mut kind, mut channel_config, mut voucher) = (None, None, None);
        c.object(|c, key| match key {
            "type" => once(&mut kind, c.text().filter(|k| *k == "voucher")),
            "channelConfig" => once(&mut channel_config, config(c)),
            "voucher" => once(&mut voucher, signed(c)),
            _ => None,
        })?;
        kind?;
        Some(BatchEvmPayload::Voucher {
            channel_config: channel_config?,
            voucher: voucher?,
        })
    }

    /// How many channel configs a thread keeps the text of (emptied when full).
    pub(super) const CONFIGS_MAX: usize = 256;

    thread_local! {
        /// The text of channel configs read lately on this thread, and what it reads as: a
        /// channel resends its config with every voucher, and reading its seven fields (five
        /// addresses, a salt) cost each voucher ~2.5k instructions; finding its text, a hash
        /// of it. A map, not a few slots: a server is paid on many channels at once (four
        /// slots missed every voucher of the load harness's 33 channels).
        static CONFIGS: std::cell::RefCell<HashMap<Box<str>, ChannelConfig>> =
            std::cell::RefCell::new(HashMap::default());
    }

    /// The config object at the cursor: a kept one when the text up to the first `}` is a
    /// kept text (a config object holds no `}` but its last: its values are hex and a
    /// number, and only such texts are kept; its extent and value depend on its own bytes
    /// only), else read and kept.
    fn config(c: &mut Cursor<'_>) -> Option<ChannelConfig> {
        let start = c.at();
        let rest = c.rest();
        if let Some(end) = memchr::memchr(b'}', rest.as_bytes()) {
            let text = &rest[..=end];
            if let Some(config) = CONFIGS.with_borrow(|kept| kept.get(text).cloned()) {
                c.back_to(start + text.len());
                return Some(config);
            }
        }
        let config = read_config(c)?;
        let text = c.since(start)?;
        if memchr::memchr(b'}', text.as_bytes()) == text.len().checked_sub(1) {
            CONFIGS.with_borrow_mut(|kept| {
                if kept.len() >= CONFIGS_MAX {
                    kept.clear();
                }
                kept.insert(Box::from(text), config.clone());
            });
        }
        Some(config)
    }

    fn read_config(c: &mut Cursor<'_>) -> Option<ChannelConfig> {
        let (mut payer, mut payer_authorizer, mut receiver) = (None, None, None);
        let (mut receiver_authorizer, mut token) = (None, None);
        let (mut withdraw_delay, mut salt) = (None, None);
        let address = |c: &mut Cursor<'_>| FromHex::from_hex(c.string(42)?).ok();
        c.object(|c, key| match key {
            "payer" => once(&mut payer, address(c)),
            "payerAuthorizer" => once(&mut payer_authorizer, address(c)),
            "receiver" => once(&mut receiver, address(c)),
            "receiverAuthorizer" => once(&mut receiver_authorizer, address(c)),
            "token" => once(&mut token, address(c)),
            "withdrawDelay" => once(&mut withdraw_delay, c.uint()),
            "salt" => once(&mut salt, FromHex::from_hex(c.string(66)?).ok()),
            _ => None,
        })?;
        Some(ChannelConfig {
            payer: payer?,
            payer_authorizer: payer_authorizer?,
            receiver: receiver?,
            receiver_authorizer: receiver_authorizer?,
            token: token?,
            withdraw_delay: withdraw_delay?,
            salt: salt?,
        })
    }

    fn signed(c: &mut Cursor<'_>) -> Option<Voucher> {
        let (mut channel_id, mut max_claimable_amount, mut signature) = (None, None, None);
        c.object(|c, key| match key {
            "channelId" => once(&mut channel_id, FromHex::from_hex(c.string(66)?).ok()),
            "maxClaimableAmount" => once(
                &mut max_claimable_amount,
                super::super::decimal::parse(c.string(0)?),
            ),
            // 65 bytes: an EOA's signature.
            "signature" => once(
                &mut signature,
                hex::decode(c.string(132)?).ok().map(Into::into),
            ),
            _ => None,
        })?;
        Some(Voucher {
            channel_id: channel_id?,
            max_claimable_amount: max_claimable_amount?,
            signature: signature?,
        })
    }
}

mod opt_decimal {
    use alloy_primitives::U256;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<U256>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::super::decimal::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<U256>, D::Error> {
        super::super::decimal::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::compact::SIG;
    const ID: &str = "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480";

    /// The config's fields in the order of `order`.
    fn config(order: [usize; 7]) -> String {
        let fields = [
            r#""payer":"0x857b06519E91e3A54538791bDbb0E22373e36b66""#,
            r#""payerAuthorizer":"0x857b06519E91e3A54538791bDbb0E22373e36b66""#,
            r#""receiver":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C""#,
            r#""receiverAuthorizer":"0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc""#,
            r#""token":"0x036CbD53842c5426634e7929541eC2318f3dCF7e""#,
            r#""withdrawDelay":900"#,
            r#""salt":"0x0000000000000000000000000000000000000000000000000000000000000007""#,
        ];
        super::super::compact::object_of(&fields, &order)
    }

    #[test]
    fn kept_configs_read_as_the_whole() {
        // More channels than a thread keeps, each met twice in a row and again after the
        // others: every answer is serde's.
        let voucher =
            format!(r#"{{"channelId":"{ID}","maxClaimableAmount":"25000","signature":"{SIG}"}}"#);
        let docs: Vec<String> = (0..super::compact::CONFIGS_MAX + 44)
            .map(|i| {
                let salt = format!("{:064x}", i);
                let doc = format!(
                    r#"{{"type":"voucher","channelConfig":{},"voucher":{voucher}}}"#,
                    config([0, 1, 2, 3, 4, 5, 6])
                );
                doc.replace(&format!("{:064x}", 7), &salt)
            })
            .collect();
        for _ in 0..2 {
            for doc in &docs {
                let serde: BatchEvmPayload = serde_json::from_str(doc).expect("valid");
                for _ in 0..2 {
                    assert_eq!(compact::payload(doc).as_ref(), Some(&serde), "{doc}");
                }
            }
        }
    }

    #[test]
    fn compact_path_agrees_with_serde() {
        let voucher =
            format!(r#"{{"channelId":"{ID}","maxClaimableAmount":"25000","signature":"{SIG}"}}"#);
        let docs = vec![
            // As the official client writes it.
            format!(
                r#"{{"type":"voucher","channelConfig":{},"voucher":{voucher}}}"#,
                config([0, 1, 2, 3, 4, 5, 6])
            ),
            // Keys sorted, as a `serde_json::Value` writes it (`examples/load.rs`).
            format!(
                r#"{{"channelConfig":{},"type":"voucher","voucher":{{"signature":"{SIG}","maxClaimableAmount":"1","channelId":"{ID}"}}}}"#,
                config([0, 1, 2, 3, 6, 4, 5])
            ),
            // A refund: serde's, whatever the direct path says.
            format!(
                r#"{{"type":"refund","channelConfig":{},"voucher":{voucher},"amount":"5"}}"#,
                config([6, 5, 4, 3, 2, 1, 0])
            ),
        ];
        assert!(docs[..2].iter().all(|d| compact::payload(d).is_some()));
        assert!(compact::payload(&docs[2]).is_none());
        // Every byte of each document replaced, dropped or doubled: the direct path never
        // accepts what serde refuses, nor reads another value.
        let replacements: &[&str] = &[
            "", " ", "\"", "\\", "\\u0030", "0", "9", "a", "A", "x", "X", "g", ",", ":", "{", "}",
            "[", "\n", "\u{1}", "é", "1e3", "-", "null",
        ];
        let seeds = docs;
        let mut docs = super::super::compact::mutations(&seeds, replacements);
        // A repeated, unknown, escaped or missing field; another type; numbers at the edges.
        docs.extend(super::super::compact::edited(
            &seeds,
            &[
            (
                r#""type":"voucher""#,
                r#""type":"voucher","type":"voucher""#,
            ),
            (r#""type":"voucher""#, r#""type":"deposit""#),
            (r#""type":"voucher""#, r#""type":"vouch\u0065r""#),
            (r#""type":"voucher""#, r#""type":"voucher","x":1"#),
            (r#""type":"voucher","#, ""),
            (r#","type":"voucher""#, ""),
            (
                r#""payer":"#,
                r#""payer":"0x857b06519E91e3A54538791bDbb0E22373e36b66","payer":"#,
            ),
            (r#""payer":"#, r#""other":1,"payer":"#),
            (r#""payer":"#, r#""p\u0061yer":"#),
            (r#""salt":"#, r#""salt":null,"salt":"#),
            (r#""withdrawDelay":900"#, r#""withdrawDelay":"900""#),
            (r#""withdrawDelay":900"#, r#""withdrawDelay":-0"#),
            (r#""withdrawDelay":900"#, r#""withdrawDelay":900.0"#),
            (
                r#""withdrawDelay":900"#,
                r#""withdrawDelay":18446744073709551615"#,
            ),
            (
                r#""withdrawDelay":900"#,
                r#""withdrawDelay":18446744073709551616"#,
            ),
            (
                r#""maxClaimableAmount":"#,
                r#""maxClaimableAmount":"1","maxClaimableAmount":"#,
            ),
            (r#""25000""#, r#""340282366920938463463374607431768211456""#),
            (
                r#""25000""#,
                r#""115792089237316195423570985008687907853269984665640564039457584007913129639936""#,
            ),
            (r#""25000""#, "25000"),
            (&format!(r#""{SIG}""#), r#""0x""#),
            (&format!(r#""{SIG}""#), r#""0x01""#),
            (&format!(r#""{SIG}""#), "[1,2,3]"),
            (&format!(r#""{SIG}""#), &format!(r#""{}""#, &SIG[2..])),
            (&format!(r#""{SIG}""#), &format!(r#""{SIG}00""#)),
            (&format!(r#","signature":"{SIG}""#), ""),
            (ID, &ID[2..]),
            (ID, &ID.to_uppercase()),
        ],
        ));
        let direct = super::super::compact::agrees_with_serde(&docs, compact::payload);
        // Some mutations keep a valid compact voucher (another digit, hex case): the direct
        // path takes them too.
        assert!(direct > seeds.len() * 20, "{direct}");
    }
}
