//! Key-set files: `flotilla keyset new`, `sign` and `show`. Pushing one to a control plane is
//! in `remote::trust`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flotilla_shared::{KeySet, SignedKeySet, TrustedKeys};
use serde_json::json;

use super::bundle::{now, rfc3339};
use crate::keyfile;

/// Reads and decodes a signed key set file.
pub(super) fn read(file: &Path) -> Result<SignedKeySet> {
    let bytes =
        std::fs::read(file).with_context(|| format!("cannot read key set {}", file.display()))?;
    SignedKeySet::decode(&bytes).with_context(|| format!("{} is not a key set", file.display()))
}

/// `MODEL=SEQ`.
pub(super) fn parse_floor(text: &str) -> Result<(String, u64), String> {
    let (model, seq) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not MODEL=SEQ"))?;
    flotilla_shared::verify::check_model_name(model)?;
    let seq = seq
        .parse()
        .map_err(|_| format!("{seq:?} in {text:?} is not a sequence number"))?;
    Ok((model.to_owned(), seq))
}

pub(super) struct NewArgs {
    pub version: u64,
    pub publishers: Vec<PathBuf>,
    pub threshold: u32,
    pub control_plane: Option<PathBuf>,
    pub reset_floors: Vec<(String, u64)>,
    pub out: PathBuf,
}

pub(super) fn new(args: &NewArgs) -> Result<()> {
    if args.version < 2 {
        bail!("--version must be at least 2: key set 1 is the keys agents are configured with");
    }
    let publishers = args
        .publishers
        .iter()
        .map(|p| keyfile::load_public(p))
        .collect::<Result<Vec<_>>>()?;
    // The same rules an agent applies, before anything is written.
    TrustedKeys::new(args.version, publishers.clone(), args.threshold as usize)?;
    let mut set = KeySet::new(args.version, publishers, args.threshold, now());
    set.control_plane = args
        .control_plane
        .as_deref()
        .map(keyfile::load_public)
        .transpose()?;
    if let Some(key) = set.control_plane.filter(|k| set.publishers.contains(k)) {
        bail!(
            "control-plane key {} is also a publisher key; the two roles need separate keys",
            key.id()
        );
    }
    set.reset_floors = args
        .reset_floors
        .iter()
        .cloned()
        .collect::<BTreeMap<_, _>>();
    if set.reset_floors.len() != args.reset_floors.len() {
        bail!("--reset-floor names a model twice");
    }
    keyfile::write_atomic(&args.out, &SignedKeySet::new(&set).encode())?;
    println!(
        "key set {} -> {} ({} publisher key(s), threshold {})",
        set.version,
        args.out.display(),
        set.publishers.len(),
        set.threshold
    );
    println!(
        "unsigned: it needs a threshold of the keys trusted now and of its own; \
         `flotilla keyset sign {} --key KEY` for each",
        args.out.display()
    );
    Ok(())
}

pub(super) fn sign(file: &Path, key_files: &[PathBuf]) -> Result<()> {
    let keys = key_files
        .iter()
        .map(|k| keyfile::load_secret(k))
        .collect::<Result<Vec<_>>>()?;
    let mut signed = read(file)?;
    let set = signed
        .key_set()
        .with_context(|| format!("{} holds no readable key set", file.display()))?;
    for (key, path) in keys.iter().zip(key_files) {
        let id = key.public().id();
        if signed.add_signature(key) {
            println!(
                "signed key set {} with {} ({id})",
                set.version,
                path.display()
            );
        } else {
            println!(
                "key set {} already carries a signature by {id}",
                set.version
            );
        }
    }
    keyfile::write_atomic(file, &signed.encode())
}

pub(super) fn show(file: &Path, as_json: bool) -> Result<()> {
    let signed = read(file)?;
    let set = signed
        .key_set()
        .with_context(|| format!("{} holds no readable key set", file.display()))?;
    let signers: Vec<String> = signed
        .signatures
        .iter()
        .map(|s| s.key_id.0.to_hex())
        .collect();
    let publishers: Vec<String> = set.publishers.iter().map(|p| p.id().0.to_hex()).collect();
    if as_json {
        let doc = json!({
            "version": set.version,
            "publishers": publishers,
            "threshold": set.threshold,
            "control_plane": set.control_plane.map(|k| k.id().0.to_hex()),
            "reset_floors": set.reset_floors,
            "issued_at": set.issued_at,
            "signatures": signers,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let mut text = format!(
        "key set {} (format {}), made {}\nthreshold {} of {} publisher key(s):\n",
        set.version,
        set.format_version,
        rfc3339(set.issued_at),
        set.threshold,
        publishers.len()
    );
    for id in &publishers {
        text.push_str(&format!("  {id}\n"));
    }
    if let Some(key) = &set.control_plane {
        text.push_str(&format!(
            "control-plane key from this set on: {}\n",
            key.id().0.to_hex()
        ));
    }
    if !set.reset_floors.is_empty() {
        text.push_str("resets sequence floors:\n");
        for (model, floor) in &set.reset_floors {
            text.push_str(&format!("  {model} = {floor}\n"));
        }
    }
    text.push_str(&format!(
        "signatures (not checked here; agents check them): {}\n",
        if signers.is_empty() {
            "none".to_owned()
        } else {
            signers.join(", ")
        }
    ));
    print!("{text}");
    Ok(())
}
