//! Smart-wallet signatures: ERC-1271 signatures of deployed contract wallets and ERC-6492
//! signatures of wallets not deployed yet, checked by asking the chain.
//!
//! Two features use them: `exact` payments ([`ExactEvmVerifier::with_contract_signatures`])
//! and prepaid sign-ins ([`Prepaid::contract_signatures`](crate::prepaid::Prepaid::contract_signatures),
//! which re-exports this module as `prepaid::wallets`). In both, a signature that recovers
//! in-process to the claimed signer never reaches the chain; any other is handed to the
//! configured [`ContractSignatures`], and without one it is refused. The answer must come from
//! the chain: a long signature from an address with code is never accepted on its own.
//!
//! With the `onchain` feature, [`ProviderSignatures`] (or an
//! [`OnchainSettler`][crate::settle::onchain::OnchainSettler], which implements the trait on
//! its own RPC) makes one deployless `eth_call` of the ERC-6492 universal validator
//! ([`ERC6492_VALIDATOR_BYTECODE`]) per check: it deploys an undeployed wallet through its
//! factory inside the call (nothing is sent), asks `isValidSignature` of any contract, and
//! falls back to `ecrecover` for plain accounts.
//!
//! [`ExactEvmVerifier::with_contract_signatures`]: super::ExactEvmVerifier::with_contract_signatures
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[`ProviderSignatures`]: https://docs.rs/tower-x402/latest/tower_x402/verify/wallet/struct.ProviderSignatures.html"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[crate::settle::onchain::OnchainSettler]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html"
)]

use alloy_primitives::{Address, B256, Bytes, hex};
use alloy_sol_types::{SolType, sol_data};
use async_trait::async_trait;

use crate::verify::BoxError;

/// The 32 bytes that end an ERC-6492 wrapped signature.
pub const ERC6492_SUFFIX: B256 = B256::new(hex!(
    "6492649264926492649264926492649264926492649264926492649264926492"
));

/// Longest signature (decoded bytes) sent to the chain; longer sign-ins and payments are
/// refused before any call. Real wallets stay far below (a passkey or multisig signature
/// wrapped in ERC-6492 is a few hundred bytes to 2 KiB). Under the layer's default 8 KiB
/// [header cap](crate::PaymentLayerBuilder::max_header_bytes) the header bound (about 2.8 KiB
/// of signature, hex in base64 JSON) is met first.
pub const MAX_SIGNATURE_BYTES: usize = 8 * 1024;

/// Creation code of the ERC-6492 universal signature validator, for a deployless `eth_call`
/// (no `to`; data = this code ++ `abi.encode(address signer, bytes32 hash, bytes signature)`),
/// whose return data is one byte: `0x01` valid, `0x00` invalid.
///
/// Copied verbatim from viem 2.57.20, `constants/contracts.ts`
/// (`erc6492SignatureValidatorByteCode`, used by `actions/public/verifyHash.ts`); it is the
/// compiled `ValidateSigOffchain` of the ERC-6492 reference implementation
/// (<https://eips.ethereum.org/EIPS/eip-6492>, "Reference Implementation";
/// `AmbireTech/signature-validator` `contracts/EIP6492Full.sol`). `tests/prepaid_wallets.rs`
/// compares it with the installed viem.
pub const ERC6492_VALIDATOR_BYTECODE: &[u8] = &hex!(
    "
     608060405234801561001057600080fd5b506040516106ad3803806106ad83398101604081905261002f91610537565b
     600061003c848484610048565b9050806000526001601ff35b60007f6492649264926492649264926492649264926492
     64926492649264926492649261007483610425565b036101e75760006060808480602001905181019061009291906105
     90565b60405192955090935091506000906001600160a01b038516906100b69085906105f6565b600060405180830381
     6000865af19150503d80600081146100f3576040519150601f19603f3d011682016040523d82523d6000602084013e61
     00f8565b606091505b50509050876001600160a01b03163b60000361016057806101605760405162461bcd60e51b8152
     60206004820152601e60248201527f5369676e617475726556616c696461746f723a206465706c6f796d656e74000060
     448201526064015b60405180910390fd5b604051630b135d3f60e11b808252906001600160a01b038a1690631626ba7e
     90610190908b908790600401610612565b602060405180830381865afa1580156101ad573d6000803e3d6000fd5b5050
     50506040513d601f19601f820116820180604052508101906101d1919061064c565b6001600160e01b03191614945050
     50505061041e565b6001600160a01b0384163b1561027a57604051630b135d3f60e11b808252906001600160a01b0386
     1690631626ba7e906102279087908790600401610612565b602060405180830381865afa158015610244573d6000803e
     3d6000fd5b505050506040513d601f19601f82011682018060405250810190610268919061064c565b6001600160e01b
     03191614905061041e565b81516041146102df5760405162461bcd60e51b815260206004820152603a60248201526000
     8051602061068d83398151915260448201527f3a20696e76616c6964207369676e6174757265206c656e677468000000
     0000006064820152608401610157565b6102e761043e565b506020820151604080840151845185939260009185919081
     1061030c5761030c610676565b016020015160f81c9050601b811480159061032b57508060ff16601c14155b1561038c
     5760405162461bcd60e51b815260206004820152603b602482015260008051602061068d83398151915260448201527f
     3a20696e76616c6964207369676e617475726520762076616c756500000000006064820152608401610157565b604080
     516000808252602082018084528a905260ff841692820192909252606081018590526080810184905260019060a00160
     20604051602081039080840390855afa1580156103e0573d6000803e3d6000fd5b5050604051601f1901519150506001
     600160a01b038116158015906104165750886001600160a01b0316816001600160a01b0316145b955050505050505b93
     92505050565b600060208251101561043657600080fd5b508051015190565b6040518060600160405280600390602082
     0280368337509192915050565b6001600160a01b038116811461047157600080fd5b50565b634e487b7160e01b600052
     604160045260246000fd5b60005b838110156104a557818101518382015260200161048d565b50506000910152565b60
     0082601f8301126104bf57600080fd5b81516001600160401b038111156104d8576104d8610474565b604051601f8201
     601f19908116603f011681016001600160401b038111828210171561050657610506610474565b604052818152838201
     60200185101561051e57600080fd5b61052f82602083016020870161048a565b949350505050565b6000806000606084
     8603121561054c57600080fd5b83516105578161045c565b6020850151604086015191945092506001600160401b0381
     111561057a57600080fd5b610586868287016104ae565b9150509250925092565b6000806000606084860312156105a5
     57600080fd5b83516105b08161045c565b60208501519093506001600160401b038111156105cc57600080fd5b6105d8
     868287016104ae565b604086015190935090506001600160401b0381111561057a57600080fd5b600082516106088184
     6020870161048a565b9190910192915050565b8281526040602082015260008251806040840152610637816060850160
     20870161048a565b601f01601f1916919091016060019392505050565b60006020828403121561065e57600080fd5b81
     516001600160e01b03198116811461041e57600080fd5b634e487b7160e01b600052603260045260246000fdfe536967
     6e617475726556616c696461746f72237265636f7665725369676e6572
     "
);

/// How a payment's signer was proven ([`VerifiedPayment::signer`](super::VerifiedPayment::signer)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignerKind {
    /// The signature recovers in-process to the payer: an EOA's key (no chain call).
    #[default]
    Key,
    /// The chain judged the signature: an ERC-1271 contract wallet, deployed or (ERC-6492
    /// wrapped) to be deployed by its factory.
    Contract,
}

/// Checks signatures that only the chain can judge: ERC-1271 (`isValidSignature` of a
/// deployed wallet) and ERC-6492 (a wallet deployed later by a factory).
///
/// Implementations must really ask the chain (or an equivalent source of truth) and bound
/// their own time: the request waits for the answer.
#[async_trait]
pub trait ContractSignatures: Send + Sync + 'static {
    /// Whether `signature` by `signer` over `hash` is valid on chain `chain_id`. `hash` is
    /// the digest that was signed: the EIP-191 hash of a sign-in message, the EIP-712 digest
    /// of an `exact` payment's authorization. `Ok(false)` is a refusal (401 for a sign-in,
    /// 402 for a payment); an error is a dependency failure (503, nothing is spent).
    async fn is_valid(
        &self,
        chain_id: u64,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError>;

    /// ERC-6492 factories this checker's owner lets deploy wallets (default none). A payment
    /// verifier using this checker accepts these factories on top of its own allowlist
    /// ([`ExactEvmVerifier::with_eip6492_factories`](super::ExactEvmVerifier::with_eip6492_factories)):
    /// an `OnchainSettler` returns the factories it is allowed to call, so verifier and settler share one list. Sign-ins ignore it (their
    /// check deploys nothing).
    fn eip6492_factories(&self) -> &[Address] {
        &[]
    }
}

#[async_trait]
impl<T: ContractSignatures + ?Sized> ContractSignatures for std::sync::Arc<T> {
    async fn is_valid(
        &self,
        chain_id: u64,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        (**self).is_valid(chain_id, signer, hash, signature).await
    }

    fn eip6492_factories(&self) -> &[Address] {
        (**self).eip6492_factories()
    }
}

/// Why a contract signature could not be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContractSignatureError {
    /// No RPC for this chain: the signature is refused as if no checker were configured.
    #[error("no RPC configured for chain {0}")]
    UnsupportedChain(u64),
    /// The RPC did not answer in time.
    #[error("the RPC did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The RPC failed (transport error, or an error response other than a revert).
    #[error("RPC error: {0}")]
    Rpc(#[source] BoxError),
    /// The RPC answered something the validator cannot return.
    #[error("unexpected validator reply: 0x{0}")]
    BadReply(String),
}

impl ContractSignatureError {
    /// Wraps any error as an RPC failure.
    #[cold]
    pub fn rpc(source: impl Into<BoxError>) -> Self {
        Self::Rpc(source.into())
    }

    /// True for [`Self::UnsupportedChain`]: a refusal, not an outage.
    pub const fn is_unsupported_chain(&self) -> bool {
        matches!(self, Self::UnsupportedChain(_))
    }

    /// True when retrying later may succeed (timeouts, RPC failures, odd replies): the
    /// layer answers 503 with `Retry-After`.
    pub const fn is_unavailable(&self) -> bool {
        !self.is_unsupported_chain()
    }
}

/// The parts of an ERC-6492 wrapped signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Erc6492 {
    /// The factory that deploys the wallet.
    pub factory: Address,
    /// The call to the factory that deploys it.
    pub factory_calldata: Bytes,
    /// The signature the deployed wallet checks (ERC-1271).
    pub signature: Bytes,
}

impl Erc6492 {
    /// Reads `abi.encode(address factory, bytes factoryCalldata, bytes signature) ++ suffix`:
    /// `None` without the [suffix](ERC6492_SUFFIX), an error when it carries the suffix but
    /// the rest is not that encoding.
    pub fn decode(signature: &[u8]) -> Option<Result<Self, Erc6492Error>> {
        let body = signature.strip_suffix(ERC6492_SUFFIX.as_slice())?;
        type Wrapped = (sol_data::Address, sol_data::Bytes, sol_data::Bytes);
        Some(
            <Wrapped as SolType>::abi_decode_params(body)
                .map(|(factory, factory_calldata, signature)| Self {
                    factory,
                    factory_calldata,
                    signature,
                })
                .map_err(|_| Erc6492Error),
        )
    }

    /// The wrapped form: `abi.encode(factory, factoryCalldata, signature) ++ suffix`.
    pub fn encode(&self) -> Bytes {
        type Wrapped = (sol_data::Address, sol_data::Bytes, sol_data::Bytes);
        let mut out = <Wrapped as SolType>::abi_encode_params(&(
            self.factory,
            self.factory_calldata.clone(),
            self.signature.clone(),
        ));
        out.extend_from_slice(ERC6492_SUFFIX.as_slice());
        out.into()
    }
}

/// A signature ends in the ERC-6492 suffix but is not `abi.encode(address, bytes, bytes)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ERC-6492 signature is not abi.encode(address, bytes, bytes) before its suffix")]
pub struct Erc6492Error;

/// The data of the deployless validator call: the validator's creation code followed by its
/// constructor arguments.
pub fn validator_call_data(signer: Address, hash: B256, signature: &[u8]) -> Bytes {
    type Args = (sol_data::Address, sol_data::FixedBytes<32>, sol_data::Bytes);
    let args =
        <Args as SolType>::abi_encode_params(&(signer, hash, Bytes::copy_from_slice(signature)));
    let mut data = Vec::with_capacity(ERC6492_VALIDATOR_BYTECODE.len() + args.len());
    data.extend_from_slice(ERC6492_VALIDATOR_BYTECODE);
    data.extend_from_slice(&args);
    data.into()
}

/// The validator's answer: one byte, `0x01` valid, `0x00` invalid.
#[cfg(any(feature = "onchain", test))]
fn validator_reply(out: &[u8]) -> Result<bool, ContractSignatureError> {
    match out {
        [1] => Ok(true),
        [0] => Ok(false),
        // A 32-byte ABI bool, as some validator builds return.
        [rest @ .., last] if rest.len() == 31 && rest.iter().all(|b| *b == 0) && *last <= 1 => {
            Ok(*last == 1)
        }
        other => Err(ContractSignatureError::BadReply(hex::encode(other))),
    }
}

#[cfg(feature = "onchain")]
#[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
pub use onchain::ProviderSignatures;
#[cfg(feature = "onchain")]
pub(crate) use onchain::validate;

#[cfg(feature = "onchain")]
mod onchain {
    use std::time::Duration;

    use alloy_json_rpc::RpcError;
    use alloy_provider::{DynProvider, Provider};
    use alloy_rpc_types_eth::{BlockId, TransactionInput, TransactionRequest};

    use super::*;
    use crate::Network;

    /// Checks contract signatures with one deployless `eth_call` of the ERC-6492 universal
    /// validator ([`ERC6492_VALIDATOR_BYTECODE`]) against the latest block, through an alloy
    /// provider per chain.
    ///
    /// A revert of the call (factory failed, `isValidSignature` reverted, a bad `ecrecover`
    /// signature) is an invalid signature; a transport error, another error response or no
    /// answer within the [timeout](Self::with_timeout) (default 5 s) is an outage.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use alloy_provider::{Provider, RootProvider};
    /// use tower_x402::Network;
    /// use tower_x402::prepaid::{Bundle, Prepaid, ProviderSignatures};
    /// let rpc = RootProvider::connect("https://sepolia.base.org").await?;
    /// let wallets = ProviderSignatures::new().with_provider(Network::BASE_SEPOLIA, rpc);
    /// let prepaid = Prepaid::new(Bundle::calls(100)).contract_signatures(wallets);
    /// # let _ = prepaid; Ok(()) }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
    #[derive(Clone, Debug)]
    #[must_use]
    pub struct ProviderSignatures {
        providers: Vec<(u64, DynProvider)>,
        timeout: Duration,
    }

    impl Default for ProviderSignatures {
        fn default() -> Self {
            Self::new()
        }
    }

    impl ProviderSignatures {
        /// Default time limit of one check.
        pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

        /// No chain yet: add one with [`Self::with_provider`].
        pub fn new() -> Self {
            Self {
                providers: Vec::new(),
                timeout: Self::DEFAULT_TIMEOUT,
            }
        }

        /// Checks signatures on `network` through `provider` (which must be connected to it);
        /// replaces an earlier provider of the same network.
        pub fn with_provider<P: Provider + 'static>(
            mut self,
            network: Network,
            provider: P,
        ) -> Self {
            let id = network.chain_id();
            self.providers.retain(|(c, _)| *c != id);
            self.providers.push((id, provider.erased()));
            self
        }

        /// The time limit of one check (default 5 s).
        pub fn with_timeout(mut self, limit: Duration) -> Self {
            self.timeout = limit;
            self
        }
    }

    #[async_trait]
    impl ContractSignatures for ProviderSignatures {
        async fn is_valid(
            &self,
            chain_id: u64,
            signer: Address,
            hash: B256,
            signature: &Bytes,
        ) -> Result<bool, ContractSignatureError> {
            let provider = self
                .providers
                .iter()
                .find(|(c, _)| *c == chain_id)
                .map(|(_, p)| p)
                .ok_or(ContractSignatureError::UnsupportedChain(chain_id))?;
            validate(provider, self.timeout, signer, hash, signature).await
        }
    }

    /// One deployless `eth_call` of the validator through `provider`, within `limit`.
    pub(crate) async fn validate(
        provider: &DynProvider,
        limit: Duration,
        signer: Address,
        hash: B256,
        signature: &Bytes,
    ) -> Result<bool, ContractSignatureError> {
        // No `to`: the node runs the data as creation code and returns what the
        // constructor returns. `data` and `input` both, for nodes that read only one.
        let tx = TransactionRequest::default().input(TransactionInput::both(validator_call_data(
            signer, hash, signature,
        )));
        // The latest block: some nodes read `pending` state when the block is omitted.
        let call = provider.call(tx).block(BlockId::latest());
        match tokio::time::timeout(limit, call.into_future()).await {
            Err(_) => Err(ContractSignatureError::Timeout(limit)),
            Ok(Ok(out)) => validator_reply(&out),
            Ok(Err(RpcError::ErrorResp(payload)))
                // Code 3 is the standard "execution reverted"; some nodes only say it in
                // the message.
                if payload.code == 3
                    || payload.message.to_ascii_lowercase().contains("revert") =>
            {
                Ok(false)
            }
            Ok(Err(e)) => Err(ContractSignatureError::rpc(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::address;

    #[test]
    fn the_validator_is_the_viem_build() {
        // Length from its own constructor (`PUSH2 0x06ad ... CODECOPY`) and the suffix check
        // inside it.
        assert_eq!(ERC6492_VALIDATOR_BYTECODE.len(), 0x06ad);
        let code = hex::encode(ERC6492_VALIDATOR_BYTECODE);
        assert!(code.starts_with("608060405234801561001057600080fd5b506040516106ad38038061"));
        assert!(code.contains(&hex::encode(ERC6492_SUFFIX)));
    }

    #[test]
    fn erc6492_round_trip_and_junk() {
        let wrapped = Erc6492 {
            factory: address!("0x00000000000000000000000000000000000f4c70"),
            factory_calldata: Bytes::from_static(&[1, 2, 3, 4]),
            signature: Bytes::from(vec![7u8; 65]),
        };
        let bytes = wrapped.encode();
        assert!(bytes.ends_with(ERC6492_SUFFIX.as_slice()));
        assert_eq!(Erc6492::decode(&bytes), Some(Ok(wrapped)));
        assert_eq!(Erc6492::decode(&[7u8; 65]), None);
        let mut junk = vec![0xffu8; 40];
        junk.extend_from_slice(ERC6492_SUFFIX.as_slice());
        assert_eq!(Erc6492::decode(&junk), Some(Err(Erc6492Error)));
        assert_eq!(
            Erc6492::decode(ERC6492_SUFFIX.as_slice()),
            Some(Err(Erc6492Error))
        );
    }

    #[test]
    fn validator_call_data_is_code_then_args() {
        let signer = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let data = validator_call_data(signer, B256::repeat_byte(9), &[1, 2, 3]);
        let (code, args) = data.split_at(ERC6492_VALIDATOR_BYTECODE.len());
        assert_eq!(code, ERC6492_VALIDATOR_BYTECODE);
        // address, bytes32, offset, length, one padded word.
        assert_eq!(args.len(), 5 * 32);
        assert_eq!(&args[12..32], signer.as_slice());
        assert_eq!(&args[32..64], &[9u8; 32]);
        assert_eq!(args[127], 3);
        assert_eq!(&args[128..131], &[1, 2, 3]);
    }

    #[test]
    fn validator_replies() {
        assert!(validator_reply(&[1]).unwrap());
        assert!(!validator_reply(&[0]).unwrap());
        let mut word = [0u8; 32];
        word[31] = 1;
        assert!(validator_reply(&word).unwrap());
        assert!(validator_reply(&[]).is_err());
        assert!(validator_reply(&[2]).is_err());
        word[0] = 1;
        assert!(validator_reply(&word).is_err());
    }
}
