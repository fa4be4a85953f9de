//! Turns a fuzz input into a correctly signed bundle, so the fuzzer can reach past the signature.
//!
//! A random byte string never carries a valid Ed25519 signature, so the checks after it (manifest
//! semantics, paths, chunk arithmetic, payload framing) are out of the fuzzer's reach unless the
//! harness signs for it. The input is therefore a manifest plus a few edits:
//!
//! ```text
//! byte 0     fix-ups: which manifest fields the harness recomputes from the payload
//! byte 1     tampering: payload and signature changes made after the fix-ups
//! byte 2..4  u16 big-endian: where a payload change lands (taken modulo the payload length)
//! byte 4..   manifest CBOR
//! ```
//!
//! The payload is rebuilt from the manifest's own file list with [`synthetic_contents`], so a
//! manifest built over [`template_files`] gets back exactly its payload, and an edited file list
//! (new paths, other sizes, duplicates) gets a payload that follows it. Manifest bytes that do not
//! decode are signed as they are, over the template payload.

use flotilla_shared::bundle::{
    assemble, chunk_digests, encode_payload, payload_entries, Signature,
};
use flotilla_shared::manifest::{FileEntry, Manifest, MIN_CHUNK_SIZE};
use flotilla_shared::{SecretKey, Sha256Digest};

use crate::fixtures::{synthetic_contents, template_files, trusted_key, untrusted_key};

/// Length of the edit header in front of the manifest bytes.
pub const HEADER_LEN: usize = 4;

/// Fix-up bit: set `payload_size` to the rebuilt payload's length.
pub const FIX_PAYLOAD_SIZE: u8 = 1 << 0;
/// Fix-up bit: recompute `chunks` from the rebuilt payload and the manifest's `chunk_size`, when
/// that is at least the minimum chunk size.
pub const FIX_CHUNKS: u8 = 1 << 1;
/// Fix-up bit: set each listed file's `size` and `sha256` from the payload entry of that path.
pub const FIX_FILES: u8 = 1 << 2;
/// Fix-up bit: add a payload entry the manifest does not list, before the other fix-ups run.
pub const ADD_UNLISTED_FILE: u8 = 1 << 3;
/// Every fix-up that makes a decoded manifest agree with its payload.
pub const FIX_ALL: u8 = FIX_PAYLOAD_SIZE | FIX_CHUNKS | FIX_FILES;

/// Tamper bit: flip the low bit of one payload byte.
pub const FLIP_PAYLOAD_BYTE: u8 = 1 << 0;
/// Tamper bit: cut the payload short.
pub const TRUNCATE_PAYLOAD: u8 = 1 << 1;
/// Tamper bit: append one byte after the payload.
pub const APPEND_PAYLOAD_BYTE: u8 = 1 << 2;
/// Tamper bit: sign with an untrusted key as well, ahead of the trusted signature.
pub const SIGN_UNTRUSTED_TOO: u8 = 1 << 3;
/// Tamper bit: repeat the trusted signature.
pub const REPEAT_SIGNATURE: u8 = 1 << 4;

/// Most payload bytes the harness synthesises for one input, over all files together.
pub const MAX_SYNTHETIC_PAYLOAD: u64 = 256 * 1024;

/// Path of the entry [`ADD_UNLISTED_FILE`] adds.
pub const UNLISTED_PATH: &str = "unlisted.bin";

/// The edits one fuzz input asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edits {
    /// Fix-up bits, `FIX_*` and [`ADD_UNLISTED_FILE`].
    pub fix: u8,
    /// Tamper bits.
    pub tamper: u8,
    /// Where a payload change lands, modulo the payload length.
    pub at: u16,
}

impl Edits {
    /// No edits: the manifest bytes are signed as given over the payload their file list names.
    pub const NONE: Self = Self {
        fix: 0,
        tamper: 0,
        at: 0,
    };

    /// The four header bytes that encode these edits.
    pub fn to_header(self) -> [u8; HEADER_LEN] {
        let [hi, lo] = self.at.to_be_bytes();
        [self.fix, self.tamper, hi, lo]
    }
}

/// Splits a fuzz input into its edits and the manifest bytes; `None` when it is shorter than the
/// header.
pub fn split_input(data: &[u8]) -> Option<(Edits, &[u8])> {
    let (header, manifest) = data.split_first_chunk::<HEADER_LEN>()?;
    let edits = Edits {
        fix: header[0],
        tamper: header[1],
        at: u16::from_be_bytes([header[2], header[3]]),
    };
    Some((edits, manifest))
}

/// A fuzz input: the edit header followed by the manifest bytes.
pub fn join_input(edits: Edits, manifest_bytes: &[u8]) -> Vec<u8> {
    let mut out = edits.to_header().to_vec();
    out.extend_from_slice(manifest_bytes);
    out
}

/// Builds the signed bundle a fuzz input describes.
pub fn signed_bundle_from_input(edits: Edits, manifest_bytes: &[u8]) -> Vec<u8> {
    let decoded = flotilla_shared::bundle::decode_manifest(manifest_bytes).ok();
    let files = match &decoded {
        Some(manifest) => files_for(manifest),
        None => template_files(),
    };
    let mut payload = framed(&files);
    if edits.fix & ADD_UNLISTED_FILE != 0 {
        payload.extend(framed(&[(UNLISTED_PATH.into(), synthetic_contents(7))]));
    }

    // Re-encoding normalises the CBOR, so only do it when a fix-up changed something; otherwise
    // the verifier sees the fuzzer's exact bytes, odd encodings included.
    let signed_bytes = match decoded {
        Some(mut manifest) if edits.fix & FIX_ALL != 0 => {
            fix_up(&mut manifest, edits.fix, &payload);
            serde_cbor::to_vec(&manifest)
                .expect("invariant: a decoded manifest always encodes as CBOR again")
        }
        _ => manifest_bytes.to_vec(),
    };

    tamper_payload(&mut payload, edits);
    let signatures = signatures_for(&signed_bytes, edits.tamper);
    assemble(&signed_bytes, &signatures, &payload)
}

/// One file per manifest entry, with synthetic contents of the listed size (capped per file and
/// in total), in manifest order; duplicates stay duplicated so the payload check sees them.
fn files_for(manifest: &Manifest) -> Vec<(String, Vec<u8>)> {
    let mut budget = MAX_SYNTHETIC_PAYLOAD;
    manifest
        .files
        .iter()
        .map(|f| {
            let contents = synthetic_contents(f.size.min(budget));
            budget -= contents.len() as u64;
            (f.path.clone(), contents)
        })
        .collect()
}

/// Frames `files`, leaving out any whose path the container cannot hold (empty or over 255
/// bytes): the verifier refuses those manifests before it looks at the payload.
fn framed(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    files
        .iter()
        .filter_map(|file| encode_payload(std::slice::from_ref(file)).ok())
        .flatten()
        .collect()
}

fn fix_up(manifest: &mut Manifest, fix: u8, payload: &[u8]) {
    if fix & FIX_PAYLOAD_SIZE != 0 {
        manifest.payload_size = payload.len() as u64;
    }
    // Below the minimum chunk size the verifier refuses the manifest before it reads the chunk
    // list, and hashing a payload in one-byte chunks would only slow every such run down.
    if fix & FIX_CHUNKS != 0 && manifest.chunk_size >= MIN_CHUNK_SIZE {
        manifest.chunks = chunk_digests(payload, manifest.chunk_size);
    }
    if fix & FIX_FILES != 0 {
        let entries =
            payload_entries(payload).expect("invariant: the harness framed this payload itself");
        for file in &mut manifest.files {
            if let Some(entry) = entries.iter().find(|e| e.path == file.path) {
                *file = FileEntry {
                    path: file.path.clone(),
                    size: entry.data.len() as u64,
                    sha256: Sha256Digest::of(entry.data),
                };
            }
        }
    }
}

fn tamper_payload(payload: &mut Vec<u8>, edits: Edits) {
    let at = usize::from(edits.at);
    if edits.tamper & FLIP_PAYLOAD_BYTE != 0 && !payload.is_empty() {
        let index = at % payload.len();
        payload[index] ^= 0x01;
    }
    if edits.tamper & TRUNCATE_PAYLOAD != 0 && !payload.is_empty() {
        payload.truncate(at % payload.len());
    }
    if edits.tamper & APPEND_PAYLOAD_BYTE != 0 {
        payload.push(edits.at as u8);
    }
}

fn signatures_for(manifest_bytes: &[u8], tamper: u8) -> Vec<Signature> {
    let sign = |key: &SecretKey| Signature {
        key_id: key.public().id(),
        signature: key.sign(manifest_bytes).to_vec(),
    };
    let mut signatures = Vec::new();
    if tamper & SIGN_UNTRUSTED_TOO != 0 {
        signatures.push(sign(untrusted_key()));
    }
    let trusted = sign(trusted_key());
    if tamper & REPEAT_SIGNATURE != 0 {
        signatures.push(trusted.clone());
    }
    signatures.push(trusted);
    signatures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{signed_bundle, templates, verifier};
    use flotilla_shared::{Bundle, VerifyError};

    fn manifest_bytes_of(bundle: &[u8]) -> Vec<u8> {
        Bundle::parse(bundle).unwrap().manifest_bytes.to_vec()
    }

    #[test]
    fn input_header_round_trips() {
        let edits = Edits {
            fix: FIX_ALL,
            tamper: REPEAT_SIGNATURE,
            at: 0x1234,
        };
        let input = join_input(edits, b"cbor");
        assert_eq!(split_input(&input), Some((edits, &b"cbor"[..])));
        assert_eq!(split_input(&input[..3]), None);
    }

    #[test]
    fn unedited_template_manifest_rebuilds_its_own_bundle() {
        for (name, template) in templates() {
            let (_, original) = signed_bundle(template);
            let rebuilt = signed_bundle_from_input(Edits::NONE, &manifest_bytes_of(&original));
            assert_eq!(rebuilt, original, "{name}");
        }
    }

    #[test]
    fn fix_ups_repair_a_manifest_whose_files_changed() {
        let (mut manifest, _) = signed_bundle(crate::fixtures::embedding_template());
        manifest.files[0].size = 20_000;
        let edited = serde_cbor::to_vec(&manifest).unwrap();

        let unfixed = signed_bundle_from_input(Edits::NONE, &edited);
        assert!(verifier().verify(&unfixed).is_err());

        let fixed = Edits {
            fix: FIX_ALL,
            ..Edits::NONE
        };
        let verified = verifier()
            .verify(&signed_bundle_from_input(fixed, &edited))
            .unwrap();
        assert_eq!(verified.manifest.files[0].size, 20_000);
    }

    #[test]
    fn each_tampering_is_caught_by_the_verifier() {
        let (_, original) = signed_bundle(crate::fixtures::embedding_template());
        let manifest = manifest_bytes_of(&original);
        let cases = [
            (FLIP_PAYLOAD_BYTE, "chunk"),
            (TRUNCATE_PAYLOAD, "truncated"),
            (APPEND_PAYLOAD_BYTE, "unexpected bytes"),
        ];
        for (tamper, expected) in cases {
            let edits = Edits {
                tamper,
                at: 77,
                ..Edits::NONE
            };
            let err = verifier()
                .verify(&signed_bundle_from_input(edits, &manifest))
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{tamper:#x}: {err}");
        }

        let unlisted = Edits {
            fix: FIX_ALL | ADD_UNLISTED_FILE,
            ..Edits::NONE
        };
        let err = verifier()
            .verify(&signed_bundle_from_input(unlisted, &manifest))
            .unwrap_err();
        assert!(
            matches!(&err, VerifyError::UnlistedFile { path, .. } if path == UNLISTED_PATH),
            "{err}"
        );
    }

    #[test]
    fn extra_signatures_still_meet_the_threshold() {
        let (_, original) = signed_bundle(crate::fixtures::raw_template());
        let edits = Edits {
            tamper: SIGN_UNTRUSTED_TOO | REPEAT_SIGNATURE,
            ..Edits::NONE
        };
        let bytes = signed_bundle_from_input(edits, &manifest_bytes_of(&original));
        assert_eq!(Bundle::parse(&bytes).unwrap().signatures.len(), 3);
        assert!(verifier().verify(&bytes).is_ok());
    }

    #[test]
    fn undecodable_manifest_bytes_are_signed_as_given() {
        let bytes = signed_bundle_from_input(Edits::NONE, b"\xa1\x61");
        assert_eq!(Bundle::parse(&bytes).unwrap().manifest_bytes, b"\xa1\x61");
        assert!(matches!(
            verifier().verify(&bytes),
            Err(VerifyError::Container(_))
        ));
    }
}
