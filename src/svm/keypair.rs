//! [`Keypair`]: an ed25519 key that signs Solana messages (the fee payer's, a test payer's).

use crate::proto::svm::Pubkey;

/// An ed25519 signing key. `Debug` shows the public key only.
#[derive(Clone)]
pub struct Keypair(ed25519_dalek::SigningKey);

impl Keypair {
    /// The key of a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// A key from the system's randomness.
    ///
    /// # Errors
    /// The system has no randomness to give.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    /// The 64 bytes Solana tools write in a keypair file: seed, then public key.
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0.to_keypair_bytes()
    }

    /// The public key (the account address).
    pub fn pubkey(&self) -> Pubkey {
        Pubkey::new(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`: 64 bytes.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.0.sign(message).to_bytes()
    }
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Keypair").field(&self.pubkey()).finish()
    }
}
