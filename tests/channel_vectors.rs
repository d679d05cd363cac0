//! Vectors signed by the OFFICIAL `@x402/evm` 2.27.0 batch-settlement client
//! (`tests/clients/batch-vectors.mjs`, committed output `tests/data/batch-vectors.json`): our
//! wire types decode its deposit payloads and vouchers byte for byte, our channel id is its
//! `computeChannelId`, and our in-process checks accept its signatures (voucher: ECDSA against
//! `payerAuthorizer`; deposit: the EIP-3009 `ReceiveWithAuthorization` to the collector).

use serde_json::Value;
use tower_x402::Network;
use tower_x402::channel::{self, verify};
use tower_x402::primitives::{Address, B256, U256};
use tower_x402::proto::batch::{BatchEvmPayload, ChannelConfig, Voucher};
use tower_x402::proto::v2::PaymentRequirements;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/batch-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vectors")).expect("json")
}

#[test]
fn official_client_vectors_decode_hash_and_verify() {
    let v = vectors();
    let payer: Address = v["payer"]
        .as_str()
        .expect("payer")
        .parse()
        .expect("address");
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let what = case["description"].as_str().expect("description");
        let req: PaymentRequirements =
            serde_json::from_value(case["requirements"].clone()).expect("requirements");
        assert_eq!(req.network, Network::BASE_SEPOLIA);
        let terms = verify::ChannelTerms::from_requirements(&req).expect("terms");
        let config: ChannelConfig =
            serde_json::from_value(case["channelConfig"].clone()).expect("config");
        let id: B256 = case["channelId"]
            .as_str()
            .expect("id")
            .parse()
            .expect("b256");
        assert_eq!(
            channel::channel_id(84532, &config),
            id,
            "{what}: channel id"
        );
        assert_eq!(config.payer, payer);

        // The deposit payload, as the client sent it, decodes and re-encodes to the same JSON.
        let raw = &case["deposit"]["payload"];
        let payload = verify::parse_raw(&raw.to_string()).expect("deposit payload");
        assert_eq!(
            serde_json::to_value(&payload).expect("encode"),
            *raw,
            "{what}"
        );
        let BatchEvmPayload::Deposit {
            deposit, voucher, ..
        } = &payload
        else {
            panic!("{what}: not a deposit");
        };
        assert_eq!(voucher.channel_id, id);
        assert_eq!(voucher.max_claimable_amount, req.amount);
        let auth = deposit
            .authorization
            .erc3009_authorization
            .as_ref()
            .expect("eip3009");
        // Verified at a time inside the authorization's window.
        let valid_before = u64::try_from(auth.valid_before).expect("u64");
        let now = valid_before - 3600;
        let authentic = verify::authenticate(&terms, &payload, now).expect("official deposit");
        assert_eq!(
            authentic.deposit.map(U256::from),
            Some(deposit.amount),
            "{what}"
        );
        // The first voucher starts a channel with nothing charged.
        let accepted = verify::verify(&terms, &payload, None, now).expect("first request");
        assert_eq!(
            accepted.max_charge(),
            u128::try_from(req.amount).expect("u128")
        );

        // The later voucher: signed by the payer authorizer for its ceiling.
        let later: Voucher = serde_json::from_value(case["voucher"].clone()).expect("voucher");
        verify::check_voucher_signature(84532, &config, &later).expect("official voucher");
        let mut tampered = later.clone();
        tampered.max_claimable_amount = later
            .max_claimable_amount
            .checked_sub(U256::from(1))
            .expect("positive");
        assert_eq!(
            verify::check_voucher_signature(84532, &config, &tampered),
            Err(verify::BatchError::VoucherSignature),
            "{what}: a changed ceiling must not verify"
        );
        // A deposit seen after its authorization's window is refused.
        assert_eq!(
            verify::authenticate(&terms, &payload, valid_before),
            Err(verify::BatchError::ValidBefore)
        );
    }
}
