//! SHA-256 digests: the content address of bundles, files, chunks and keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest. Serialised as 32 raw bytes in CBOR and shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// Hashes `data` in one go.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for human-facing output.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short())
    }
}

/// The reason a hex string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("digest must be 64 hex characters, got {0:?}")]
pub struct ParseDigestError(pub String);

impl FromStr for Sha256Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseDigestError(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            return s.parse().map_err(serde::de::Error::custom);
        }
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"32 bytes"))?;
        Ok(Self(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_accepts_prefix() {
        let d = Sha256Digest::of(b"flotilla");
        assert_eq!(d.to_hex().parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(format!("sha256:{d}").parse::<Sha256Digest>().unwrap(), d);
        assert!("abc".parse::<Sha256Digest>().is_err());
    }

    #[test]
    fn cbor_is_raw_bytes_and_json_is_hex() {
        let d = Sha256Digest::of(b"x");
        let cbor = serde_cbor::to_vec(&d).unwrap();
        assert_eq!(cbor.len(), 2 + 32, "byte string header plus 32 bytes");
        assert_eq!(serde_cbor::from_slice::<Sha256Digest>(&cbor).unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", d.to_hex()));
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), d);
    }

    #[test]
    fn cbor_rejects_wrong_length() {
        let cbor = serde_cbor::to_vec(&serde_bytes::ByteBuf::from(vec![1u8; 31])).unwrap();
        assert!(serde_cbor::from_slice::<Sha256Digest>(&cbor).is_err());
    }
}
