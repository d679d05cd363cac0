//! The Solana transaction decoder and the `exact` SVM verifier on arbitrary bytes: never a
//! panic; a decoded transaction's indices all name accounts; the verifier refuses or accepts
//! without panicking. Opt-in (`scripts/fuzz svm_tx`): needs the `svm` feature.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use tower_x402::proto::PaymentPayload;
use tower_x402::proto::svm::Pubkey;
use tower_x402::svm::{SvmAsset, SvmVerifier, tx};
use tower_x402::PaymentOption;

fn setup() -> &'static (SvmVerifier, PaymentOption) {
    static S: OnceLock<(SvmVerifier, PaymentOption)> = OnceLock::new();
    S.get_or_init(|| {
        let fee_payer = Pubkey::new([1; 32]);
        let option = PaymentOption::exact_svm(
            &SvmAsset::usdc_devnet(),
            "$0.001",
            Pubkey::new([3; 32]),
            fee_payer,
        )
        .expect("valid option");
        (SvmVerifier::new([fee_payer]), option)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(t) = tx::decode(data) {
        assert_eq!(t.signatures.len(), usize::from(t.header.required_signatures));
        for ix in &t.instructions {
            let _ = t.program(ix);
            for i in 0..ix.accounts.len() {
                let _ = t.account(ix, i);
            }
        }
    }
    let (verifier, option) = setup();
    let accepted = serde_json::to_value(option.requirements()).expect("serializes");
    let proof = serde_json::json!({
        "x402Version": 2,
        "accepted": accepted,
        "payload": {"transaction": base64::engine::general_purpose::STANDARD.encode(data)},
    });
    let payload: tower_x402::proto::v2::PaymentPayload =
        serde_json::from_value(proof).expect("a valid envelope");
    let _ = verifier.verify_sync(&PaymentPayload::V2(payload), option.requirements());
});
