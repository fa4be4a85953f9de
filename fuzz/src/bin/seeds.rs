//! Writes the seed corpus for every fuzz target, and a CBOR dictionary, from the shared fixtures.
//!
//! Usage: `cargo run --bin seeds [OUT_DIR]`; `OUT_DIR` defaults to `corpus/` beside this crate's
//! `Cargo.toml`. The output is the same on every run, so the corpus is generated rather than
//! committed. Files go to `OUT_DIR/<target>/`, the dictionary to `OUT_DIR/manifest.dict`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_fuzz::fixtures::{signed_bundle, templates};
use flotilla_fuzz::mutation::{
    join_input, signed_bundle_from_input, Edits, ADD_UNLISTED_FILE, APPEND_PAYLOAD_BYTE, FIX_ALL,
    FLIP_PAYLOAD_BYTE, REPEAT_SIGNATURE, SIGN_UNTRUSTED_TOO, TRUNCATE_PAYLOAD,
};
use flotilla_shared::Bundle;
use serde_cbor::Value;

/// Edit headers each template's manifest is seeded with in `verify_signed_mutation`.
const SEED_EDITS: &[(&str, Edits)] = &[
    ("as-is", Edits::NONE),
    ("fixed", edits(FIX_ALL, 0, 0)),
    ("unlisted-file", edits(FIX_ALL | ADD_UNLISTED_FILE, 0, 0)),
    ("flipped-byte", edits(0, FLIP_PAYLOAD_BYTE, 4200)),
    ("truncated", edits(0, TRUNCATE_PAYLOAD, 9000)),
    ("trailing-byte", edits(0, APPEND_PAYLOAD_BYTE, 0)),
    ("extra-signatures", EXTRA_SIGNATURES),
];

/// Edits that add an untrusted and a repeated signature to an otherwise valid bundle.
const EXTRA_SIGNATURES: Edits = edits(0, SIGN_UNTRUSTED_TOO | REPEAT_SIGNATURE, 0);

const fn edits(fix: u8, tamper: u8, at: u16) -> Edits {
    Edits { fix, tamper, at }
}

fn main() -> anyhow::Result<()> {
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
    };

    let mut written = 0;
    let mut dictionary = BTreeSet::new();
    for (name, template) in templates() {
        let (_, bundle) = signed_bundle(template);
        let parsed = Bundle::parse(&bundle).context("parsing a freshly built seed bundle")?;
        let manifest = parsed.manifest_bytes;
        let header = &bundle[..bundle.len() - parsed.payload.len()];
        collect_tokens(
            &serde_cbor::from_slice(manifest).context("decoding a seed manifest")?,
            &mut dictionary,
        );

        let decode = out.join("decode_manifest");
        written += write(&decode, &format!("{name}.manifest.cbor"), manifest)?;
        written += write(&decode, &format!("{name}.bundle"), &bundle)?;
        written += write(&decode, &format!("{name}.header"), header)?;

        let verify = out.join("verify_bundle");
        written += write(&verify, &format!("{name}.bundle"), &bundle)?;
        written += write(&verify, &format!("{name}.header"), header)?;
        let resigned = signed_bundle_from_input(EXTRA_SIGNATURES, manifest);
        written += write(
            &verify,
            &format!("{name}.extra-signatures.bundle"),
            &resigned,
        )?;

        let mutation = out.join("verify_signed_mutation");
        for (edit_name, edits) in SEED_EDITS {
            let input = join_input(*edits, manifest);
            written += write(&mutation, &format!("{name}.{edit_name}"), &input)?;
        }
    }

    let dict_path = out.join("manifest.dict");
    fs::write(&dict_path, dictionary_text(&dictionary))
        .with_context(|| format!("writing {}", dict_path.display()))?;
    println!(
        "wrote {written} seeds and {} dictionary entries under {}",
        dictionary.len(),
        out.display()
    );
    Ok(())
}

/// Writes one seed file, creating its folder; returns 1 for the count.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(1)
}

/// Every map key and text value in a manifest, CBOR-encoded with its header, so the fuzzer can
/// splice in a complete field name or enum spelling.
fn collect_tokens(value: &Value, out: &mut BTreeSet<Vec<u8>>) {
    match value {
        Value::Text(_) => {
            out.insert(serde_cbor::to_vec(value).expect("invariant: text always encodes"));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_tokens(v, out)),
        Value::Map(map) => {
            for (key, v) in map {
                collect_tokens(key, out);
                collect_tokens(v, out);
            }
        }
        Value::Tag(_, inner) => collect_tokens(inner, out),
        _ => {}
    }
}

/// libFuzzer dictionary syntax: one `"..."` per line, non-printable bytes as `\xNN`.
fn dictionary_text(tokens: &BTreeSet<Vec<u8>>) -> String {
    let mut text = String::from("# CBOR field names and text values from the seed manifests.\n");
    for token in tokens {
        text.push('"');
        for &byte in token {
            let printable = byte.is_ascii_graphic() || byte == b' ';
            if printable && byte != b'"' && byte != b'\\' {
                text.push(char::from(byte));
            } else {
                write!(text, "\\x{byte:02x}").expect("invariant: writing to a String cannot fail");
            }
        }
        text.push_str("\"\n");
    }
    text
}
