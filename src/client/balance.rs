//! Optional balance check before signing: skip options the payer cannot cover.

use alloy_primitives::{Address, U256};
use async_trait::async_trait;

use crate::Network;
use crate::verify::BoxError;

/// Where the client reads the payer's token balance before signing.
///
/// With a source set, options the balance cannot cover are skipped (the next cheapest is
/// tried) and a call none can cover fails with
/// [`Refusal::InsufficientBalance`](super::Refusal::InsufficientBalance) before anything is
/// signed. With the `onchain` feature, [`ProviderBalance`] reads `balanceOf` through an alloy
/// provider.
///
#[cfg_attr(
    not(feature = "onchain"),
    doc = "[`ProviderBalance`]: https://docs.rs/tower-x402/latest/tower_x402/client/struct.ProviderBalance.html"
)]
#[async_trait]
pub trait BalanceSource: Send + Sync + 'static {
    /// The balance of `owner` in the token `asset` on `network`; `Ok(None)` when this source
    /// cannot tell (another chain): the option is then not checked.
    async fn balance(
        &self,
        network: Network,
        asset: Address,
        owner: Address,
    ) -> Result<Option<U256>, BoxError>;
}

#[cfg(feature = "onchain")]
#[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
pub use onchain::ProviderBalance;

#[cfg(feature = "onchain")]
mod onchain {
    use super::*;
    use alloy_network::TransactionBuilder;
    use alloy_provider::{DynProvider, Provider};
    use alloy_rpc_types_eth::{BlockId, TransactionRequest};
    use alloy_sol_types::{SolCall, sol};

    sol! {
        function balanceOf(address account) external view returns (uint256);
    }

    /// Reads `balanceOf` with an `eth_call` through an alloy provider for one network.
    #[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
    #[derive(Clone, Debug)]
    pub struct ProviderBalance {
        network: Network,
        provider: DynProvider,
    }

    impl ProviderBalance {
        /// Reads balances on `network` through `provider` (which must be connected to it).
        pub fn new<P: Provider + 'static>(network: Network, provider: P) -> Self {
            Self {
                network,
                provider: provider.erased(),
            }
        }
    }

    #[async_trait]
    impl BalanceSource for ProviderBalance {
        async fn balance(
            &self,
            network: Network,
            asset: Address,
            owner: Address,
        ) -> Result<Option<U256>, BoxError> {
            if network != self.network {
                return Ok(None);
            }
            let tx = TransactionRequest::default()
                .with_to(asset)
                .with_input(balanceOfCall { account: owner }.abi_encode());
            let out = self.provider.call(tx).block(BlockId::latest()).await?;
            Ok(Some(balanceOfCall::abi_decode_returns(&out)?))
        }
    }
}
