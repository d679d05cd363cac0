//! [`PaymentOption`]: one way to pay for a route, as sent in the challenge's `accepts`.

use alloy_primitives::{Address, U256};
use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::network::Asset;
use crate::price::parse_price;
use crate::proto::v2::PaymentRequirements;

/// One way to pay for a route: an `exact` payment of `amount` of `asset` to `pay_to`.
///
/// ```
/// use tower_x402::{Asset, PaymentOption};
/// use tower_x402::primitives::address;
/// let opt = PaymentOption::exact(
///     &Asset::usdc_base_sepolia(),
///     "$0.001",
///     address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
/// )
/// .unwrap();
/// assert_eq!(opt.requirements().amount.to::<u64>(), 1000);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PaymentOption {
    requirements: PaymentRequirements,
}

impl PaymentOption {
    /// Default `maxTimeoutSeconds` (the reference's).
    pub const DEFAULT_MAX_TIMEOUT_SECONDS: u64 = 300;

    /// `price` (e.g. `"$0.001"`, exact decimal) of `asset`, paid to `pay_to`.
    ///
    /// # Errors
    /// The price does not parse, is zero or too precise for the asset's decimals; `pay_to` is
    /// the zero address; the asset lacks its EIP-712 name or version.
    pub fn exact(asset: &Asset, price: &str, pay_to: Address) -> Result<Self, ConfigError> {
        let amount = parse_price(price, asset.decimals)?;
        Self::exact_atomic(asset, amount, pay_to)
    }

    /// `amount` atomic units of `asset`, paid to `pay_to`.
    ///
    /// # Errors
    /// As [`PaymentOption::exact`].
    pub fn exact_atomic(asset: &Asset, amount: U256, pay_to: Address) -> Result<Self, ConfigError> {
        if amount.is_zero() {
            return Err(ConfigError::ZeroPrice);
        }
        if pay_to.is_zero() {
            return Err(ConfigError::PayTo);
        }
        if asset.eip712_name.is_empty() || asset.eip712_version.is_empty() {
            return Err(ConfigError::MissingEip712Domain(asset.address));
        }
        let mut extra = Map::new();
        extra.insert("name".into(), Value::String(asset.eip712_name.clone()));
        extra.insert(
            "version".into(),
            Value::String(asset.eip712_version.clone()),
        );
        Ok(Self {
            requirements: PaymentRequirements {
                scheme: crate::verify::exact::SCHEME.into(),
                network: asset.network,
                amount,
                asset: asset.address.into(),
                pay_to: pay_to.into(),
                max_timeout_seconds: Self::DEFAULT_MAX_TIMEOUT_SECONDS,
                extra: Some(extra),
            },
        })
    }

    /// An `upto` payment (metered billing, x402 `scheme_upto_evm`): the client signs a Permit2
    /// permit for at most `max_price` of `asset`, the handler reports what the call used
    /// through [`crate::upto::Usage`], and the layer settles that much (or nothing) once.
    ///
    /// `facilitator` is the account that sends the settlement transaction, e.g.
    /// [`OnchainSettler::relayer`][crate::settle::onchain::OnchainSettler::relayer]: the
    /// payer signs it into the permit, and the upto proxy refuses any other sender. The payer
    /// must have approved Permit2 for `asset` beforehand (a one-time ERC-20 `approve`).
    ///
    /// ```
    /// use tower_x402::{Asset, PaymentOption};
    /// use tower_x402::primitives::address;
    /// let opt = PaymentOption::upto(
    ///     &Asset::usdc_base_sepolia(),
    ///     "$0.05",
    ///     address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    ///     address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
    /// )
    /// .unwrap();
    /// assert_eq!(opt.requirements().scheme, "upto");
    /// assert_eq!(opt.requirements().amount.to::<u64>(), 50_000);
    /// ```
    ///
    /// # Errors
    /// As [`PaymentOption::exact`]; also a zero `facilitator`.
    ///
    #[cfg_attr(
        not(feature = "onchain"),
        doc = "[crate::settle::onchain::OnchainSettler::relayer]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html#method.relayer"
    )]
    pub fn upto(
        asset: &Asset,
        max_price: &str,
        pay_to: Address,
        facilitator: Address,
    ) -> Result<Self, ConfigError> {
        let max = parse_price(max_price, asset.decimals)?;
        Self::upto_atomic(asset, max, pay_to, facilitator)
    }

    /// As [`PaymentOption::upto`], with the maximum in atomic units.
    ///
    /// # Errors
    /// As [`PaymentOption::upto`].
    pub fn upto_atomic(
        asset: &Asset,
        max: U256,
        pay_to: Address,
        facilitator: Address,
    ) -> Result<Self, ConfigError> {
        if facilitator.is_zero() {
            return Err(ConfigError::UptoFacilitator);
        }
        let mut opt = Self::exact_atomic(asset, max, pay_to)?;
        opt.requirements.scheme = crate::verify::upto::SCHEME.into();
        // The upto client reads only `facilitatorAddress`; name and version stay for clients
        // that show the token.
        if let Some(extra) = opt.requirements.extra.as_mut() {
            extra.insert(
                crate::verify::upto::FACILITATOR_ADDRESS.into(),
                Value::String(facilitator.to_checksum(None)),
            );
        }
        Ok(opt)
    }

    /// A Solana `exact` payment: `price` of `asset` (an SPL token) to `pay_to`'s associated
    /// token account, the transaction's fees paid by `fee_payer` (`extra.feePayer`: this
    /// server's key, which co-signs at settlement, or a facilitator's), as the reference
    /// server offers it.
    ///
    /// # Errors
    /// The price does not parse, is zero or too precise for the asset's decimals; `pay_to`
    /// or `fee_payer` is the all-zero key; the asset is not on a Solana network.
    #[cfg(feature = "svm")]
    #[cfg_attr(docsrs, doc(cfg(feature = "svm")))]
    pub fn exact_svm(
        asset: &crate::svm::SvmAsset,
        price: &str,
        pay_to: crate::proto::svm::Pubkey,
        fee_payer: crate::proto::svm::Pubkey,
    ) -> Result<Self, ConfigError> {
        let amount = parse_price(price, asset.decimals)?;
        if amount.is_zero() {
            return Err(ConfigError::ZeroPrice);
        }
        let zero = crate::proto::svm::Pubkey::default();
        if pay_to == zero || fee_payer == zero || !asset.network.is_solana() {
            return Err(ConfigError::PayTo);
        }
        let mut extra = Map::new();
        extra.insert("feePayer".into(), Value::String(fee_payer.to_string()));
        Ok(Self {
            requirements: PaymentRequirements {
                scheme: crate::verify::exact::SCHEME.into(),
                network: asset.network,
                amount,
                asset: asset.mint.into(),
                pay_to: pay_to.into(),
                max_timeout_seconds: Self::DEFAULT_MAX_TIMEOUT_SECONDS,
                extra: Some(extra),
            },
        })
    }

    /// A `batch-settlement` payment (payment channels, x402 `scheme_batch_settlement_evm`):
    /// the client deposits into the escrow once, then signs a cumulative voucher per request
    /// of at most `max` atomic units of `asset`. The channel's receiver is `pay_to`; the
    /// server's `receiver_authorizer` key signs claims and refunds; a payer's timed withdrawal
    /// waits `withdraw_delay` seconds (15 minutes to 30 days), the window in which the server
    /// must claim. `extra` carries exactly what the official client reads: `receiverAuthorizer`,
    /// `withdrawDelay`, `name`, `version`, `assetTransferMethod`.
    ///
    /// `method` says how deposits move the tokens: [`Eip3009`] (a `receiveWithAuthorization`
    /// to the ERC-3009 deposit collector: USDC and other FiatToken-style tokens) or
    /// [`Permit2`] (a Permit2 `PermitWitnessTransferFrom` to the Permit2 deposit collector,
    /// bound to the channel: any ERC-20 the payer has approved Permit2 for). Each method's
    /// deposits are verified in-process; the other method's are refused.
    ///
    /// [`Eip3009`]: crate::channel::AssetTransferMethod::Eip3009
    /// [`Permit2`]: crate::channel::AssetTransferMethod::Permit2
    ///
    /// Not served by the layer's verifier yet: serve such requests with
    /// [`channel::serve::Channels`](crate::channel::serve::Channels).
    ///
    /// ```
    /// use tower_x402::{Asset, PaymentOption};
    /// use tower_x402::channel::AssetTransferMethod;
    /// use tower_x402::primitives::{U256, address};
    /// let opt = PaymentOption::batch_settlement(
    ///     &Asset::usdc_base_sepolia(),
    ///     U256::from(1000),
    ///     address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    ///     address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"),
    ///     900,
    ///     AssetTransferMethod::Eip3009,
    /// )
    /// .unwrap();
    /// assert_eq!(opt.requirements().scheme, "batch-settlement");
    /// assert_eq!(opt.requirements().extra.as_ref().unwrap()["withdrawDelay"], 900);
    /// let permit2 = PaymentOption::batch_settlement(
    ///     &Asset::usdc_base_sepolia(),
    ///     U256::from(1000),
    ///     address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    ///     address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"),
    ///     900,
    ///     AssetTransferMethod::Permit2,
    /// )
    /// .unwrap();
    /// assert_eq!(permit2.requirements().extra.as_ref().unwrap()["assetTransferMethod"], "permit2");
    /// ```
    ///
    /// # Errors
    /// As [`PaymentOption::exact`]; also a zero `receiver_authorizer` or a withdraw delay out
    /// of range.
    pub fn batch_settlement(
        asset: &Asset,
        max: U256,
        pay_to: Address,
        receiver_authorizer: Address,
        withdraw_delay: u64,
        method: crate::channel::AssetTransferMethod,
    ) -> Result<Self, ConfigError> {
        use crate::channel::{MAX_WITHDRAW_DELAY, MIN_WITHDRAW_DELAY, extra, verify::BatchError};
        if receiver_authorizer.is_zero() {
            return Err(BatchError::ReceiverAuthorizerMismatch.into());
        }
        if !(MIN_WITHDRAW_DELAY..=MAX_WITHDRAW_DELAY).contains(&withdraw_delay) {
            return Err(BatchError::WithdrawDelayOutOfRange.into());
        }
        if u128::try_from(max).is_err() {
            return Err(BatchError::VoucherPayload.into());
        }
        let mut opt = Self::exact_atomic(asset, max, pay_to)?;
        opt.requirements.scheme = crate::channel::SCHEME.into();
        if let Some(e) = opt.requirements.extra.as_mut() {
            e.insert(
                extra::RECEIVER_AUTHORIZER.into(),
                Value::String(receiver_authorizer.to_checksum(None)),
            );
            e.insert(extra::WITHDRAW_DELAY.into(), Value::from(withdraw_delay));
            e.insert(
                extra::ASSET_TRANSFER_METHOD.into(),
                Value::String(method.as_str().into()),
            );
        }
        Ok(opt)
    }

    /// True for an `upto` option.
    pub fn is_upto(&self) -> bool {
        self.requirements.scheme == crate::verify::upto::SCHEME
    }

    /// Sets `maxTimeoutSeconds` (default 300): also the longest validity accepted.
    ///
    /// # Errors
    /// Zero seconds.
    pub fn with_max_timeout(mut self, secs: u64) -> Result<Self, ConfigError> {
        if secs == 0 {
            return Err(ConfigError::ZeroTimeout);
        }
        self.requirements.max_timeout_seconds = secs;
        Ok(self)
    }

    /// This option with other requirements (a channel's corrective 402 adds its state).
    pub(crate) fn with_requirements(requirements: PaymentRequirements) -> Self {
        Self { requirements }
    }

    /// The requirements as sent in `accepts`.
    pub fn requirements(&self) -> &PaymentRequirements {
        &self.requirements
    }
}
