//! Harness shared by the end-to-end tests: where the repository is, and walking its sources.

use std::path::{Path, PathBuf};

pub mod bench;
pub mod fleet;
pub mod procs;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every file under `dir` whose name ends with `extension`, skipping build output and VCS data.
pub fn source_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let skipped = name.starts_with('.')
                || name == "target"
                || name == "corpus"
                || name == "artifacts";
            if path.is_dir() && !skipped {
                stack.push(path);
            } else if name.ends_with(extension) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The committed test models.
pub fn models_dir() -> PathBuf {
    repo_root().join("models")
}

/// Deterministic keys for tests: a publisher and the control plane.
pub struct TestKeys {
    /// Signs bundles.
    pub publisher: flotilla_shared::SecretKey,
    /// Signs desired states.
    pub control_plane: flotilla_shared::SecretKey,
}

impl Default for TestKeys {
    fn default() -> Self {
        Self {
            publisher: flotilla_shared::SecretKey::from_seed([11; 32]),
            control_plane: flotilla_shared::SecretKey::from_seed([22; 32]),
        }
    }
}

/// Packs a committed model (a name under `models/`, or an absolute model directory) with the
/// real packer and signs it with `key`.
pub fn pack_signed(model: &str, key: &flotilla_shared::SecretKey) -> Vec<u8> {
    pack_signed_with(model, key, |_| {})
}

/// Like [`pack_signed`], after letting `edit` change the spec directory's copy of the model
/// (for example to bump its version and sequence).
pub fn pack_signed_with(
    model: &str,
    key: &flotilla_shared::SecretKey,
    edit: impl FnOnce(&Path),
) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    pack_signed_at(model, key, edit, now)
}

/// Like [`pack_signed_with`], packed as if the clock said `now` (Unix seconds): the bundle
/// is made then and expires `valid_days` after.
pub fn pack_signed_at(
    model: &str,
    key: &flotilla_shared::SecretKey,
    edit: impl FnOnce(&Path),
    now: u64,
) -> Vec<u8> {
    let source = if Path::new(model).is_absolute() {
        PathBuf::from(model)
    } else {
        models_dir().join(model)
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    for entry in std::fs::read_dir(&source).expect("model directory") {
        let entry = entry.expect("directory entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy model file");
    }
    edit(dir.path());
    let packed = flotilla_control_plane::pack::pack(dir.path(), now, &()).expect("model packs");
    let mut bundle = flotilla_shared::Bundle::parse(&packed.bytes).expect("packed bundle parses");
    bundle.add_signature(key);
    bundle.to_bytes()
}

/// Like [`pack_signed`] with a smaller transfer chunk size, for multi-chunk downloads.
pub fn pack_signed_chunked(
    model: &str,
    key: &flotilla_shared::SecretKey,
    chunk_size: u32,
) -> Vec<u8> {
    pack_signed_with(model, key, |dir| set_chunk_size(dir, chunk_size))
}

/// Sets the transfer chunk size in a copied model's bundle.toml.
pub fn set_chunk_size(dir: &Path, chunk_size: u32) {
    let spec_path = dir.join("bundle.toml");
    let spec = std::fs::read_to_string(&spec_path).expect("bundle.toml");
    std::fs::write(spec_path, format!("chunk_size = {chunk_size}\n{spec}"))
        .expect("write bundle.toml");
}

/// Rewrites `version` and `sequence` in a copied model's bundle.toml.
pub fn set_release(dir: &Path, version: &str, sequence: u64) {
    flotilla_control_plane::pack::set_release(dir, None, version, sequence)
        .expect("rewrite bundle.toml");
}

/// Path of a workspace binary built in the same profile as the running test or benchmark,
/// building it first if needed (so `cargo test -p flotilla-tests` works on its own).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let package = match name {
        "flotilla-agent" => "flotilla-agent",
        _ => "flotilla-control-plane",
    };
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", package, "--bin", name])
        .current_dir(repo_root());
    // Cargo runs this process with its package's variables set (CARGO_PKG_NAME, OUT_DIR and
    // the like). Build scripts (ring's, cc's) watch some of those names, and cargo compares
    // them against its own environment: inherited, they would mark those scripts changed, and
    // this build and cargo's own would keep rebuilding the TLS stack and the agent in turn
    // (minutes on every benchmark run).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_by_cargo = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*key);
        if set_by_cargo {
            build.env_remove(&*key);
        }
    }
    // A benchmark (cargo runs it with `--bench`) was built in the bench profile: build the
    // binary in the same one, so that it reuses what that build made.
    if std::env::args().any(|arg| arg == "--bench") {
        build.args(["--profile", "bench"]);
    } else if release {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build of {name} failed");
    profile_dir.join(name)
}

/// Runs the `flotilla` binary (built once per test binary) with `args`; returns whether it
/// succeeded, its stdout and its stderr.
pub fn run_flotilla(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let binary = BINARY.get_or_init(|| binary("flotilla"));
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .expect("flotilla runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The identity key tests give agent `agent` when they speak MQTT in its name.
pub fn agent_key(agent: &str) -> flotilla_shared::SecretKey {
    flotilla_shared::SecretKey::from_seed(flotilla_shared::Sha256Digest::of(agent.as_bytes()).0)
}

/// What `agent` publishes on its `topic`: `body` in an envelope numbered `seq`, signed with
/// [`agent_key`] as a real agent signs with its own.
pub fn agent_report<T: serde::Serialize>(agent: &str, topic: &str, seq: u64, body: T) -> Vec<u8> {
    let envelope = flotilla_shared::wire::Envelope::new(agent, seq, 0, body);
    flotilla_shared::wire::SignedReport::seal(topic, envelope.encode(), &agent_key(agent))
}

/// The presence `agent` with `labels` announces when it connects in `session`, for a host of
/// this machine's architecture that runs tract and serves no model, naming [`agent_key`]: for
/// tests that speak MQTT in an agent's name.
pub fn birth(
    agent: &str,
    session: u64,
    labels: &[(&str, &str)],
) -> flotilla_shared::wire::Presence {
    use flotilla_shared::wire::{Birth, Capabilities, Presence};
    Presence::Online(Birth {
        session,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        capabilities: Capabilities {
            architecture: std::env::consts::ARCH.into(),
            cores: 2,
            memory_bytes: 1 << 30,
            gpu: false,
            backends: vec![flotilla_shared::manifest::Backend::Tract],
            agent_version: "0.1.0".into(),
        },
        active: None,
        key_set: 1,
        key_set_digest: None,
        identity: agent_key(agent).public(),
    })
}

/// Writes `key`'s public half as PEM into `dir/name.pub` and returns the path.
pub fn write_public_key(dir: &Path, name: &str, key: &flotilla_shared::SecretKey) -> PathBuf {
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, key.public().to_pem().expect("pem")).expect("write public key");
    path
}

/// A TCP port on 127.0.0.1 that was free when asked and that no other caller in this process
/// has been given; bind it soon.
///
/// Ports come from just below the kernel's ephemeral range. Asking the kernel for port 0
/// would hand out a port from that range, where any outgoing connection (an MQTT client, a
/// test's HTTP client) may take it before the server meant to listen there binds it; and it
/// may hand the same port to two parallel tests.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const SPAN: u32 = 8192;
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768);
        ephemeral_low.saturating_sub(SPAN).max(1024)
    });
    // Test binaries run one after another; starting each at its own offset keeps one clear
    // of ports a previous one's stray children may still hold.
    let offset = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let port = start + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("invariant: below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {start}..{}", start + SPAN);
}
