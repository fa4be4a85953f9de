//! Key and bundle commands: keygen, pack, sign, verify, inspect.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use flotilla_agent::runtime::available_backends;
use flotilla_shared::manifest::{Manifest, SelfTestInput};
use flotilla_shared::verify::check_manifest;
use flotilla_shared::{Bundle, HostProfile, Verifier};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::keyfile;
use crate::pack::{self, Progress};

/// Exit status for a bundle that failed verification, distinct from usage errors (2).
pub const EXIT_INVALID: i32 = 1;

pub(super) fn keygen(name: &str, dir: &Path) -> Result<()> {
    let pair = keyfile::generate(name, dir)?;
    println!("secret key  {}", pair.secret.display());
    println!("public key  {}", pair.public.display());
    println!("key id      {}", pair.id);
    Ok(())
}

struct Spinner(ProgressBar);

impl Progress for Spinner {
    fn step(&self, message: &str) {
        self.0.set_message(message.to_owned());
        self.0.tick();
    }
}

pub(super) fn pack(model_dir: &Path, out: &Path) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}").expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let packed = pack::pack(model_dir, now(), &Spinner(bar.clone()));
    bar.finish_and_clear();
    let packed = packed?;

    keyfile::write_atomic(out, &packed.bytes)?;
    let m = &packed.manifest;
    println!(
        "packed {} seq {} -> {} ({} bytes, {} files, {} chunks, digest {})",
        m.id(),
        m.sequence,
        out.display(),
        packed.bytes.len(),
        m.files.len(),
        m.chunks.len(),
        packed.digest.short()
    );
    if !packed.computed.is_empty() {
        println!(
            "computed expected outputs with tract for self-tests: {}",
            packed.computed.join(", ")
        );
    }
    println!(
        "unsigned: sign it with `flotilla bundle sign {} --key KEY`",
        out.display()
    );
    Ok(())
}

fn read_bundle(file: &Path) -> Result<Vec<u8>> {
    fs::read(file).with_context(|| format!("cannot read bundle {}", file.display()))
}

pub(super) fn sign(file: &Path, key_files: &[PathBuf]) -> Result<()> {
    let keys = key_files
        .iter()
        .map(|k| keyfile::load_secret(k))
        .collect::<Result<Vec<_>>>()?;
    let bytes = read_bundle(file)?;
    let mut bundle = Bundle::parse(&bytes)
        .with_context(|| format!("{} is not a valid bundle", file.display()))?;
    // Refuse to put a signature on something agents would reject anyway.
    let manifest = bundle
        .decode_manifest_unverified()
        .with_context(|| format!("{} has an unreadable manifest", file.display()))?;
    check_manifest(&bundle.digest(), &manifest)
        .with_context(|| format!("refusing to sign {}", file.display()))?;

    for (key, path) in keys.iter().zip(key_files) {
        let id = key.public().id();
        if bundle.add_signature(key) {
            println!("signed {} with {} ({id})", manifest.id(), path.display());
        } else {
            println!("{} already carries a signature by {id}", manifest.id());
        }
    }
    let signed = bundle.to_bytes();
    keyfile::write_atomic(file, &signed)?;
    Ok(())
}

pub(super) struct VerifyArgs {
    pub file: PathBuf,
    pub trust: Vec<PathBuf>,
    pub threshold: usize,
    pub min_seq: Option<u64>,
    pub check_host: bool,
}

pub(super) fn verify(args: &VerifyArgs) -> Result<()> {
    let trusted = args
        .trust
        .iter()
        .map(|k| keyfile::load_public(k))
        .collect::<Result<Vec<_>>>()?;
    let bytes = read_bundle(&args.file)?;
    let mut verifier = Verifier::new(&trusted, args.threshold, now())?;
    if let Some(floor) = args.min_seq {
        verifier = verifier.sequence_floor(floor);
    }
    if args.check_host {
        verifier = verifier.host(this_host());
    }

    match verifier.verify(&bytes) {
        Ok(v) => {
            let m = &v.manifest;
            println!(
                "valid: {} seq {} digest {} signed by {}/{} required key(s) ({}), expires {}",
                m.id(),
                m.sequence,
                v.digest.short(),
                v.signed_by.len(),
                args.threshold,
                v.signed_by
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                rfc3339(m.expires_at)
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("invalid: {}: {e}", args.file.display());
            std::process::exit(EXIT_INVALID);
        }
    }
}

/// This host, as the agent running here would describe it.
pub fn this_host() -> HostProfile {
    HostProfile {
        architecture: std::env::consts::ARCH.to_owned(),
        backends: available_backends(),
        accelerator: false,
        agent_version: flotilla_agent::agent_version(),
    }
}

pub(super) fn inspect(file: &Path, as_json: bool) -> Result<()> {
    let bytes = read_bundle(file)?;
    let bundle = Bundle::parse(&bytes)
        .with_context(|| format!("{} is not a valid bundle", file.display()))?;
    let digest = bundle.digest();
    let manifest = bundle
        .decode_manifest_unverified()
        .with_context(|| format!("{} has an unreadable manifest", file.display()))?;
    let key_ids: Vec<String> = bundle
        .signatures
        .iter()
        .map(|s| s.key_id.0.to_hex())
        .collect();

    if as_json {
        let doc = json!({
            "digest": digest.to_hex(),
            "size": bytes.len(),
            "signatures": key_ids,
            "manifest": manifest,
        });
        return write_stdout(&(serde_json::to_string_pretty(&doc)? + "\n"));
    }
    write_stdout(&describe_manifest(
        file,
        bytes.len(),
        &digest.to_hex(),
        &key_ids,
        &manifest,
    ))
}

/// Writes long output, treating a closed pipe (`| head`) as the reader having had enough.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to standard output"),
    }
}

fn describe_manifest(
    file: &Path,
    size: usize,
    digest: &str,
    keys: &[String],
    m: &Manifest,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // Writing to a String cannot fail.
    macro_rules! w {
        ($($arg:tt)*) => { let _ = writeln!(out, $($arg)*); };
    }
    w!("bundle      {} ({size} bytes)", file.display());
    w!("model       {} (sequence {})", m.id(), m.sequence);
    w!("digest      {digest}");
    w!("created     {}", rfc3339(m.created_at));
    w!("expires     {}", rfc3339(m.expires_at));
    w!(
        "task        {} (entry {}, opset {})",
        m.model.task,
        m.model.entry,
        m.model.opset
    );
    for i in &m.model.inputs {
        w!("input       {} {} {}", i.name, i.datatype, i.shape_string());
    }
    for o in &m.model.outputs {
        w!("output      {} {} {}", o.name, o.datatype, o.shape_string());
    }
    if let Some(t) = &m.model.text {
        w!(
            "text        tokenizer {}, max {} tokens ({:?}), pooling {:?}, normalize {}, output {}",
            t.tokenizer,
            t.max_sequence_length,
            t.truncation,
            t.pooling,
            t.normalize,
            t.output
        );
    }
    if !m.model.labels.is_empty() {
        w!("labels      {}", m.model.labels.join(", "));
    }
    let r = &m.requirements;
    let backends: Vec<String> = r.backends.iter().map(ToString::to_string).collect();
    let arch = if r.architectures.is_empty() {
        "any".to_owned()
    } else {
        r.architectures.join(", ")
    };
    w!(
        "requires    backends {}, architectures {arch}, accelerator {}, agent >= {}",
        backends.join(", "),
        r.accelerator,
        r.min_agent_version
            .as_ref()
            .map_or("any".to_owned(), ToString::to_string)
    );
    for f in &m.files {
        w!(
            "file        {} {} bytes sha256 {}",
            f.path,
            f.size,
            f.sha256.short()
        );
    }
    w!(
        "payload     {} bytes in {} chunks of {}",
        m.payload_size,
        m.chunks.len(),
        m.chunk_size
    );
    for t in &m.self_tests {
        let input = match &t.input {
            SelfTestInput::Texts(texts) => format!("{} text(s)", texts.len()),
            SelfTestInput::Tensors(ts) => format!("{} tensor(s)", ts.len()),
        };
        w!(
            "self-test   {}: {input}, tolerance {:e}",
            t.name,
            t.tolerance
        );
    }
    if keys.is_empty() {
        w!("signatures  none");
    }
    for k in keys {
        w!("signature   key {}", &k[..12]);
    }
    out
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
