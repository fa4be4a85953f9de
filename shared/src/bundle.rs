//! The one-file bundle container: framing, payload entries, building and signing.
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! "FLOTILLA"            8-byte magic
//! u16                   container version (1)
//! u32 + bytes           manifest (CBOR), at most MAX_MANIFEST_BYTES
//! u32 + bytes           signatures (CBOR array of {key_id, signature}), at most MAX_SIGNATURES_BYTES
//! payload               manifest.payload_size bytes: entries of
//!                       u16 path length, path (UTF-8), u64 data length, data
//! ```
//!
//! Signatures cover the exact manifest bytes and live outside them, so signing never changes the
//! manifest, and the bundle digest (SHA-256 of the manifest bytes) is stable from packing on.
//! The payload is chunked for transfer; the manifest lists every chunk's hash.

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::keys::{KeyId, SecretKey};
use crate::manifest::{FileEntry, Manifest};

/// First eight bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"FLOTILLA";

/// The container layout this crate writes and reads.
pub const CONTAINER_VERSION: u16 = 1;

/// Largest manifest accepted, so a hostile length field cannot make a reader allocate wildly.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Largest signature block accepted.
pub const MAX_SIGNATURES_BYTES: usize = 64 * 1024;

/// Longest header (magic, version, manifest and signature block with their lengths) a bundle
/// can have: reading this much of a file is enough for [`Bundle::parse_header`].
pub const MAX_HEADER_BYTES: usize =
    MAGIC.len() + 2 + 4 + MAX_MANIFEST_BYTES + 4 + MAX_SIGNATURES_BYTES;

/// Longest payload path, in bytes.
pub const MAX_PATH_BYTES: usize = 255;

/// One signature over the manifest bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Which key made it.
    pub key_id: KeyId,
    /// The 64-byte Ed25519 signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why bytes are not a well-formed bundle container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The data ends before a section is complete.
    #[error("bundle is truncated: {section} needs {needed} bytes, {available} remain")]
    Truncated {
        /// Section being read.
        section: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left.
        available: u64,
    },
    /// The data does not start with the bundle magic.
    #[error("not a flotilla bundle (bad magic)")]
    BadMagic,
    /// A container version this build cannot read.
    #[error("unsupported bundle container version {0}")]
    UnsupportedContainer(u16),
    /// The manifest length field is over the limit.
    #[error("manifest of {size} bytes exceeds the {limit}-byte limit")]
    ManifestTooLarge {
        /// Declared size.
        size: u64,
        /// Limit.
        limit: usize,
    },
    /// The signature block length field is over the limit.
    #[error("signature block of {size} bytes exceeds the {limit}-byte limit")]
    SignaturesTooLarge {
        /// Declared size.
        size: u64,
        /// Limit.
        limit: usize,
    },
    /// The signature block is not valid CBOR of the expected shape.
    #[error("malformed signature block: {0}")]
    SignaturesDecode(String),
    /// The manifest is not valid CBOR of the expected shape.
    #[error("malformed manifest: {0}")]
    ManifestDecode(String),
    /// A payload entry is cut short or its header is malformed.
    #[error("malformed payload at byte {offset}: {reason}")]
    PayloadMalformed {
        /// Offset within the payload.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file to pack has a path that cannot be framed.
    #[error("cannot pack {path:?}: {reason}")]
    Pack {
        /// The offending path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A parsed container; borrows the bytes it came from.
#[derive(Debug, Clone)]
pub struct Bundle<'a> {
    /// The exact manifest bytes the signatures cover.
    pub manifest_bytes: &'a [u8],
    /// Signatures in file order.
    pub signatures: Vec<Signature>,
    /// The payload section: everything after the signatures.
    pub payload: &'a [u8],
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, section: &'static str) -> Result<&'a [u8], BundleError> {
        let available = (self.data.len() - self.pos) as u64;
        if n > available {
            return Err(BundleError::Truncated {
                section,
                needed: n,
                available,
            });
        }
        let n = n as usize;
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u16(&mut self, section: &'static str) -> Result<u16, BundleError> {
        let b = self.take(2, section)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, section: &'static str) -> Result<u32, BundleError> {
        let b = self.take(4, section)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, section: &'static str) -> Result<u64, BundleError> {
        let b = self.take(8, section)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }
}

impl<'a> Bundle<'a> {
    /// Splits container bytes into manifest, signatures and payload. Checks framing only: nothing
    /// here is trusted until [`crate::Verifier::verify`] has checked the signatures.
    pub fn parse(data: &'a [u8]) -> Result<Self, BundleError> {
        let (manifest_bytes, signatures, header_len) = Self::parse_header(data)?;
        Ok(Self {
            manifest_bytes,
            signatures,
            payload: &data[header_len..],
        })
    }

    /// Parses only the header (magic, manifest, signatures) and returns its length, so a receiver
    /// that fetched the header alone can check it before asking for payload chunks.
    pub fn parse_header(data: &'a [u8]) -> Result<(&'a [u8], Vec<Signature>, usize), BundleError> {
        let mut r = Reader { data, pos: 0 };
        if r.take(MAGIC.len() as u64, "magic")? != MAGIC {
            return Err(BundleError::BadMagic);
        }
        let version = r.u16("container version")?;
        if version != CONTAINER_VERSION {
            return Err(BundleError::UnsupportedContainer(version));
        }

        let manifest_len = r.u32("manifest length")?;
        if manifest_len as usize > MAX_MANIFEST_BYTES {
            return Err(BundleError::ManifestTooLarge {
                size: manifest_len.into(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let manifest_bytes = r.take(manifest_len.into(), "manifest")?;

        let sig_len = r.u32("signature block length")?;
        if sig_len as usize > MAX_SIGNATURES_BYTES {
            return Err(BundleError::SignaturesTooLarge {
                size: sig_len.into(),
                limit: MAX_SIGNATURES_BYTES,
            });
        }
        let sig_bytes = r.take(sig_len.into(), "signature block")?;
        let signatures: Vec<Signature> = serde_cbor::from_slice(sig_bytes)
            .map_err(|e| BundleError::SignaturesDecode(e.to_string()))?;

        Ok((manifest_bytes, signatures, r.pos))
    }

    /// SHA-256 of the manifest bytes: the bundle's content address.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(self.manifest_bytes)
    }

    /// Decodes the manifest without checking any signature; for display and for the verifier.
    pub fn decode_manifest_unverified(&self) -> Result<Manifest, BundleError> {
        decode_manifest(self.manifest_bytes)
    }

    /// Writes the container back out, with whatever signatures `self` now holds.
    pub fn to_bytes(&self) -> Vec<u8> {
        assemble(self.manifest_bytes, &self.signatures, self.payload)
    }

    /// Adds a signature by `key` unless that key has signed already; returns whether it added one.
    pub fn add_signature(&mut self, key: &SecretKey) -> bool {
        let key_id = key.public().id();
        if self.signatures.iter().any(|s| s.key_id == key_id) {
            return false;
        }
        let signature = key.sign(self.manifest_bytes).to_vec();
        self.signatures.push(Signature { key_id, signature });
        true
    }
}

/// Decodes manifest CBOR. Unknown and duplicate fields are errors, as are trailing bytes.
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, BundleError> {
    serde_cbor::from_slice(bytes).map_err(|e| BundleError::ManifestDecode(e.to_string()))
}

/// Frames manifest bytes, signatures and a payload into container bytes.
pub fn assemble(manifest_bytes: &[u8], signatures: &[Signature], payload: &[u8]) -> Vec<u8> {
    let sig_bytes = serde_cbor::to_vec(&signatures.to_vec())
        .expect("invariant: a Vec of plain structs always encodes as CBOR");
    let mut out = Vec::with_capacity(
        MAGIC.len() + 2 + 4 + manifest_bytes.len() + 4 + sig_bytes.len() + payload.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&CONTAINER_VERSION.to_be_bytes());
    out.extend_from_slice(&(manifest_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(manifest_bytes);
    out.extend_from_slice(&(sig_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&sig_bytes);
    out.extend_from_slice(payload);
    out
}

/// One payload entry as found in the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadEntry<'a> {
    /// Path as written in the entry header.
    pub path: &'a str,
    /// Byte offset of the data within the payload.
    pub offset: u64,
    /// The file contents.
    pub data: &'a [u8],
}

/// Splits a payload section into its entries, in order.
pub fn payload_entries(payload: &[u8]) -> Result<Vec<PayloadEntry<'_>>, BundleError> {
    let mut r = Reader {
        data: payload,
        pos: 0,
    };
    let mut entries = Vec::new();
    while !r.rest().is_empty() {
        let start = r.pos as u64;
        let malformed = |e: BundleError| BundleError::PayloadMalformed {
            offset: start,
            reason: e.to_string(),
        };
        let path_len = r.u16("payload path length").map_err(malformed)?;
        let path = r.take(path_len.into(), "payload path").map_err(malformed)?;
        let path = std::str::from_utf8(path).map_err(|_| BundleError::PayloadMalformed {
            offset: start,
            reason: "path is not UTF-8".into(),
        })?;
        let size = r.u64("payload entry size").map_err(malformed)?;
        let offset = r.pos as u64;
        let data =
            r.take(size, "payload entry data")
                .map_err(|e| BundleError::PayloadMalformed {
                    offset: start,
                    reason: format!("{path:?}: {e}"),
                })?;
        entries.push(PayloadEntry { path, offset, data });
    }
    Ok(entries)
}

/// Frames files into a payload section, in the order given.
pub fn encode_payload(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, BundleError> {
    let mut out = Vec::new();
    for (path, data) in files {
        if path.is_empty() || path.len() > MAX_PATH_BYTES {
            return Err(BundleError::Pack {
                path: path.clone(),
                reason: format!("path must be 1 to {MAX_PATH_BYTES} bytes"),
            });
        }
        out.extend_from_slice(&(path.len() as u16).to_be_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_be_bytes());
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// SHA-256 of each `chunk_size` slice of `payload`.
pub fn chunk_digests(payload: &[u8], chunk_size: u32) -> Vec<Sha256Digest> {
    payload
        .chunks(chunk_size.max(1) as usize)
        .map(Sha256Digest::of)
        .collect()
}

/// Assembles a bundle from a manifest template and the files it carries.
///
/// The template's `files`, `payload_size`, `chunk_size` and `chunks` are filled in here; every
/// other field is taken as given.
pub struct BundleBuilder {
    manifest: Manifest,
    files: Vec<(String, Vec<u8>)>,
}

impl BundleBuilder {
    /// Starts from a manifest template; its file and chunk fields are overwritten by
    /// [`BundleBuilder::build`].
    pub fn new(manifest: Manifest) -> Self {
        Self {
            manifest,
            files: Vec::new(),
        }
    }

    /// Adds a payload file.
    pub fn file(mut self, path: impl Into<String>, data: Vec<u8>) -> Self {
        self.files.push((path.into(), data));
        self
    }

    /// Hashes and chunks the files and returns the completed manifest and the unsigned bundle.
    pub fn build(mut self) -> Result<(Manifest, Vec<u8>), BundleError> {
        let payload = encode_payload(&self.files)?;
        self.manifest.files = self
            .files
            .iter()
            .map(|(path, data)| FileEntry {
                path: path.clone(),
                size: data.len() as u64,
                sha256: Sha256Digest::of(data),
            })
            .collect();
        self.manifest.payload_size = payload.len() as u64;
        self.manifest.chunks = chunk_digests(&payload, self.manifest.chunk_size);

        let manifest_bytes = serde_cbor::to_vec(&self.manifest)
            .expect("invariant: the manifest's plain structs always encode as CBOR");
        let bytes = assemble(&manifest_bytes, &[], &payload);
        Ok((self.manifest, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_entries_round_trip() {
        let files = vec![
            ("a.onnx".to_owned(), vec![1, 2, 3]),
            ("dir/b.json".to_owned(), vec![]),
        ];
        let payload = encode_payload(&files).unwrap();
        let entries = payload_entries(&payload).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].path, "a.onnx");
        assert_eq!(entries[0].data, &[1, 2, 3]);
        assert_eq!(entries[1].path, "dir/b.json");
        assert!(entries[1].data.is_empty());
    }

    #[test]
    fn cut_payload_entry_is_malformed_not_a_panic() {
        let payload = encode_payload(&[("a".to_owned(), vec![9; 10])]).unwrap();
        for cut in 0..payload.len() {
            let result = payload_entries(&payload[..cut]);
            if cut == 0 {
                assert!(result.unwrap().is_empty());
            } else {
                assert!(
                    matches!(result, Err(BundleError::PayloadMalformed { .. })),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn empty_and_overlong_paths_cannot_be_packed() {
        assert!(encode_payload(&[(String::new(), vec![])]).is_err());
        assert!(encode_payload(&[("x".repeat(256), vec![])]).is_err());
    }

    #[test]
    fn chunk_digests_cover_a_partial_last_chunk() {
        let payload = vec![0u8; 10_000];
        let chunks = chunk_digests(&payload, 4096);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2], Sha256Digest::of(&payload[8192..]));
    }
}
