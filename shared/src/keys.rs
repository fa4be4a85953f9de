//! Ed25519 keys: PEM encoding, key ids, signing and strict verification.
//!
//! Keys are stored as standard PEM (PKCS#8 for secret keys, SubjectPublicKeyInfo for public
//! keys), so operators can inspect them with ordinary tools. A key id is the SHA-256 of the raw
//! 32-byte public key.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// Identifies a public key: SHA-256 of its 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub Sha256Digest);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.short())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0.short())
    }
}

/// Why key material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not a PEM-encoded Ed25519 secret key.
    #[error("not an ed25519 secret key in PKCS#8 PEM form: {0}")]
    DecodeSecret(String),
    /// The text is not a PEM-encoded Ed25519 public key.
    #[error("not an ed25519 public key in PEM form: {0}")]
    DecodePublic(String),
    /// The public key is a weak (small-order) point that strict verification refuses.
    #[error("public key {0} is a weak key")]
    WeakKey(KeyId),
    /// Encoding failed (only on allocation trouble inside the encoder).
    #[error("cannot encode key: {0}")]
    Encode(String),
}

/// An Ed25519 signing key.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Builds a key from 32 secret bytes (the caller supplies randomness; this crate does no IO).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Parses a PKCS#8 PEM document.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| KeyError::DecodeSecret(e.to_string()))
    }

    /// Encodes as a PKCS#8 PEM document.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.0
            .to_pkcs8_pem(Default::default())
            .map(|z| z.to_string())
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().id())
    }
}

/// An Ed25519 verifying key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM document, refusing weak keys.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem)
            .map(Self)
            .map_err(|e| KeyError::DecodePublic(e.to_string()))?;
        key.refuse_weak()
    }

    /// Builds a key from its 32 raw bytes, refusing invalid and weak points.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|e| KeyError::DecodePublic(e.to_string()))?;
        key.refuse_weak()
    }

    fn refuse_weak(self) -> Result<Self, KeyError> {
        if self.0.is_weak() {
            return Err(KeyError::WeakKey(self.id()));
        }
        Ok(self)
    }

    /// Encodes as a SubjectPublicKeyInfo PEM document.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.0
            .to_public_key_pem(Default::default())
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// SHA-256 of the raw bytes.
    pub fn id(&self) -> KeyId {
        KeyId(Sha256Digest::of(self.0.as_bytes()))
    }

    /// Strict verification: refuses non-canonical signatures and small-order components.
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// [`PublicKey::verify_strict`] for a signature as it travels (bytes of any length): one
    /// that is not 64 bytes long does not verify.
    pub fn verify_strict_bytes(&self, message: &[u8], signature: &[u8]) -> bool {
        <&[u8; 64]>::try_from(signature)
            .is_ok_and(|signature| self.verify_strict(message, signature))
    }
}

/// CBOR: the 32 raw bytes; JSON: those bytes in hex. Decoding refuses invalid and weak
/// points, as [`PublicKey::from_bytes`] does.
impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(self.to_bytes()))
        } else {
            serializer.serialize_bytes(&self.to_bytes())
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            hex::decode(&text).map_err(serde::de::Error::custom)?
        } else {
            serde_bytes::ByteBuf::deserialize(deserializer)?.into_vec()
        };
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"32 bytes"))?;
        Self::from_bytes(&array).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_signatures_verify() {
        let secret = SecretKey::from_seed([7; 32]);
        let again = SecretKey::from_pem(&secret.to_pem().unwrap()).unwrap();
        assert_eq!(again.public(), secret.public());

        let public = PublicKey::from_pem(&secret.public().to_pem().unwrap()).unwrap();
        let sig = secret.sign(b"manifest");
        assert!(public.verify_strict(b"manifest", &sig));
        assert!(!public.verify_strict(b"manifesT", &sig));
    }

    #[test]
    fn key_id_is_sha256_of_raw_public_key() {
        let public = SecretKey::from_seed([1; 32]).public();
        assert_eq!(public.id().0, Sha256Digest::of(&public.to_bytes()));
    }

    #[test]
    fn secret_and_public_pem_are_not_interchangeable() {
        let secret = SecretKey::from_seed([2; 32]);
        assert!(PublicKey::from_pem(&secret.to_pem().unwrap()).is_err());
        assert!(SecretKey::from_pem(&secret.public().to_pem().unwrap()).is_err());
        assert!(PublicKey::from_pem("garbage").is_err());
    }

    #[test]
    fn public_keys_travel_as_raw_bytes_and_weak_ones_do_not_decode() {
        let public = SecretKey::from_seed([3; 32]).public();
        let cbor = serde_cbor::to_vec(&public).unwrap();
        assert_eq!(serde_cbor::from_slice::<PublicKey>(&cbor).unwrap(), public);
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = serde_cbor::to_vec(&serde_bytes::Bytes::new(&identity)).unwrap();
        assert!(serde_cbor::from_slice::<PublicKey>(&weak).is_err());
    }

    #[test]
    fn public_keys_read_as_hex_in_json() {
        let public = SecretKey::from_seed([4; 32]).public();
        let json = serde_json::to_string(&public).unwrap();
        assert_eq!(json, format!("\"{}\"", hex::encode(public.to_bytes())));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), public);
        assert!(serde_json::from_str::<PublicKey>("\"abcd\"").is_err());
    }

    #[test]
    fn weak_public_keys_are_refused() {
        // The identity point encodes as 1 followed by zeros: small order, so weak.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            PublicKey::from_bytes(&identity),
            Err(KeyError::WeakKey(_))
        ));
    }
}
