//! The operator CLI's remote verbs (`bundle push/list`, `rollout ...`, `agents`, `events`): the
//! real `flotilla` binary against a real control plane started in-process.

#[path = "../../agent/tests/support/broker.rs"]
mod broker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use flotilla_control_plane::server::config::{
    hash_token, ApiTls, MqttConfig, Role, ServerConfig, TokenConfig, TrustConfig,
};
use flotilla_control_plane::server::hub::Admission;
use flotilla_control_plane::server::{self, unix_ms, RunningServer};
use flotilla_shared::wire::{topics, Presence};
use flotilla_shared::Bundle;
use flotilla_tests::procs::KillOnDrop;
use flotilla_tests::{
    free_port, pack_signed, pack_signed_with, set_release, write_public_key, TestKeys,
};
use serde_json::Value;
use tempfile::TempDir;

const OPERATOR_TOKEN: &str = "operator-token-for-cli-tests";
const VIEWER_TOKEN: &str = "viewer-token-for-cli-tests";
const ADMIN_TOKEN: &str = "admin-token-for-cli-tests";
const MODEL: &str = "tiny-mlp-raw";

/// The `flotilla` binary, built once per test run.
fn flotilla_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| flotilla_tests::binary("flotilla"))
}

/// What one CLI run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }

    /// Exit 1 with `error: ...` naming `needle` on standard error.
    fn fails_with(self, needle: &str) -> Self {
        assert_eq!(self.code, Some(1), "expected exit 1: {self:#?}");
        assert!(
            self.stderr.starts_with("error: ") && self.stderr.contains(needle),
            "expected {needle:?} in stderr: {self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// A control plane on ephemeral ports with an operator and a viewer token, a trusted
/// publisher key, and a temporary data directory; stopped when dropped.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    dir: TempDir,
    keys: TestKeys,
    url: String,
}

impl Fixture {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Like [`Fixture::start`], with `edit` applied to the server's config.
    fn start_with(edit: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let keys = TestKeys::default();
        let publisher = write_public_key(dir.path(), "publisher", &keys.publisher);
        let token = |name: &str, role, secret: &str| TokenConfig {
            name: name.into(),
            role,
            sha256: hash_token(secret),
        };
        let config = ServerConfig {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().expect("address"),
            mqtt: MqttConfig {
                listen: format!("127.0.0.1:{}", free_port())
                    .parse()
                    .expect("address"),
                ..MqttConfig::default()
            },
            trust: TrustConfig {
                publishers: vec![publisher],
                threshold: 1,
                ..TrustConfig::default()
            },
            tokens: vec![
                token("ops", Role::Operator, OPERATOR_TOKEN),
                token("viewer", Role::Viewer, VIEWER_TOKEN),
                token("admin", Role::Admin, ADMIN_TOKEN),
            ],
            ..ServerConfig::default()
        };
        let mut config = config;
        edit(&mut config);
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        let server = runtime
            .block_on(server::start(config))
            .expect("server starts");
        let url = server.api_url.clone();
        Self {
            runtime,
            server: Some(server),
            dir,
            keys,
            url,
        }
    }

    fn command(&self, token: Option<&str>, args: &[&str]) -> Command {
        let mut command = Command::new(flotilla_binary());
        command
            .args(args)
            .env("FLOTILLA_SERVER", &self.url)
            .env_remove("FLOTILLA_TOKEN")
            .env("NO_COLOR", "1");
        if let Some(token) = token {
            command.env("FLOTILLA_TOKEN", token);
        }
        command
    }

    /// Runs `flotilla ARGS` against this server with `token` in `FLOTILLA_TOKEN`.
    fn cli(&self, token: Option<&str>, args: &[&str]) -> Run {
        let output = self.command(token, args).output().expect("flotilla runs");
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn operator(&self, args: &[&str]) -> Run {
        self.cli(Some(OPERATOR_TOKEN), args)
    }

    /// Writes `bytes` into the fixture's directory and returns the path as text.
    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path.to_str().expect("UTF-8 temp path").to_owned()
    }

    /// Packs and signs the test model; returns its file and digest.
    fn signed_bundle(&self) -> (String, String) {
        let bytes = pack_signed(MODEL, &self.keys.publisher);
        let digest = Bundle::parse(&bytes)
            .expect("bundle parses")
            .digest()
            .to_hex();
        (self.file("model.bundle", &bytes), digest)
    }

    /// Registers an online agent as if its birth had arrived over MQTT.
    fn add_agent(&self, id: &str, labels: &[(&str, &str)]) {
        self.presence(id, flotilla_tests::birth(id, 1, labels));
    }

    /// Marks an agent added with [`Fixture::add_agent`] offline, as its will would.
    fn agent_left(&self, id: &str) {
        self.presence(id, Presence::Offline { session: 1 });
    }

    fn presence(&self, id: &str, presence: Presence) {
        let topic = topics::agent_state(id);
        let payload = flotilla_tests::agent_report(id, &topic, 1, presence);
        let server = self.server.as_ref().expect("server running");
        server
            .hub()
            .lock()
            .expect("hub lock")
            .on_agent_message(&topic, &payload, unix_ms());
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.stop());
        }
    }
}

#[test]
fn pushed_bundle_is_listed_by_digest_and_a_second_push_is_already_held() {
    let fx = Fixture::start();
    let (file, digest) = fx.signed_bundle();

    let first = fx.operator(&["bundle", "push", &file]).ok();
    assert!(
        first.stdout.contains("tiny-mlp-raw@1.0.0 uploaded (new)"),
        "{first:#?}"
    );
    assert!(
        first.stdout.contains(&format!("sha256:{digest}")),
        "{first:#?}"
    );

    let listed = fx
        .cli(Some(VIEWER_TOKEN), &["bundle", "list", "--json"])
        .ok();
    let bundles = listed.json();
    let bundles = bundles.as_array().expect("a JSON array");
    assert_eq!(bundles.len(), 1, "{listed:#?}");
    assert_eq!(bundles[0]["digest"], digest.as_str());
    assert_eq!(bundles[0]["name"], MODEL);

    let table = fx.cli(Some(VIEWER_TOKEN), &["bundle", "list"]).ok();
    let mut lines = table.stdout.lines();
    assert!(
        lines.next().is_some_and(|h| h.starts_with("BUNDLE ")),
        "{table:#?}"
    );
    let row = lines.next().expect("one row");
    assert!(
        row.starts_with("tiny-mlp-raw@1.0.0 ") && row.contains(&digest[..12]),
        "{row}"
    );

    let again = fx.operator(&["bundle", "push", &file, "--json"]).ok();
    assert_eq!(again.json()["digest"], digest.as_str());
    let again = fx.operator(&["bundle", "push", &file]).ok();
    assert!(again.stdout.contains("already held"), "{again:#?}");
}

#[test]
fn garbage_and_unsigned_uploads_show_the_refusal_and_exit_1() {
    let fx = Fixture::start();

    let garbage = fx.file("garbage.bundle", b"this is not a bundle at all");
    fx.operator(&["bundle", "push", &garbage])
        .fails_with("bundle refused:")
        .fails_with("(HTTP 400)");

    let dir = fx.dir.path().join("unsigned-model");
    std::fs::create_dir(&dir).expect("model copy");
    for entry in std::fs::read_dir(flotilla_tests::models_dir().join(MODEL)).expect("model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    let unsigned = fx.file("unsigned.bundle", &[]);
    let packed = fx.operator(&[
        "bundle",
        "pack",
        dir.to_str().expect("UTF-8"),
        "--out",
        &unsigned,
    ]);
    packed.ok();
    fx.operator(&["bundle", "push", &unsigned])
        .fails_with("bundle refused:")
        .fails_with("(HTTP 400)");

    let missing = fx.dir.path().join("no-such.bundle");
    fx.operator(&["bundle", "push", missing.to_str().expect("UTF-8")])
        .fails_with("cannot open bundle");

    let empty = fx.operator(&["bundle", "list", "--json"]).ok();
    assert_eq!(empty.json(), serde_json::json!([]), "nothing was stored");
}

#[test]
fn a_bundle_over_the_upload_limit_is_refused_with_the_limit_named() {
    let fx = Fixture::start_with(|c| c.max_upload_bytes = 1 << 16);
    // Far more than socket buffers hold: the server's early answer would otherwise arrive
    // as a broken pipe in the middle of the upload.
    let large = fx.file("large.bundle", &vec![0; 64 << 20]);
    fx.operator(&["bundle", "push", &large]).fails_with(
        "large.bundle is 67108864 bytes, over the server's upload limit of 65536 bytes",
    );
    let empty = fx.operator(&["bundle", "list", "--json"]).ok();
    assert_eq!(empty.json(), serde_json::json!([]), "nothing was stored");
}

#[test]
fn the_cli_speaks_https_to_a_server_with_a_certificate_it_trusts() {
    let files = broker::tls_files();
    let fx = Fixture::start_with(|c| {
        c.api_tls = Some(ApiTls {
            cert_file: files.server_cert.clone(),
            key_file: files.server_key.clone(),
        })
    });
    assert!(fx.url.starts_with("https://127.0.0.1:"), "{}", fx.url);
    let ca = files.ca.to_str().expect("UTF-8");
    let (file, digest) = fx.signed_bundle();

    let pushed = fx
        .operator(&["bundle", "push", &file, "--json", "--ca-file", ca])
        .ok();
    assert_eq!(pushed.json()["digest"], digest.as_str());
    let mut listing = fx.command(Some(VIEWER_TOKEN), &["bundle", "list", "--json"]);
    let listing = listing.env("FLOTILLA_CA_FILE", ca).output().expect("runs");
    assert!(listing.status.success(), "{listing:?}");
    let listed: Value = serde_json::from_slice(&listing.stdout).expect("JSON");
    assert_eq!(listed[0]["digest"], digest.as_str());

    // Not trusting the server's CA is a refusal that says what to do; plain HTTP to the HTTPS
    // port gets no answer at all.
    fx.operator(&["agents"])
        .fails_with("certificate")
        .fails_with("--ca-file");
    let plain = fx.url.replacen("https://", "http://", 1);
    fx.operator(&["agents", "--server", &plain])
        .fails_with("is the server https://?");
}

/// Copies the test PKI's `cert` and `key` over `into`'s two files.
fn install_certificate(cert: &Path, key: &Path, into: &ApiTls) {
    std::fs::copy(cert, &into.cert_file).expect("copy certificate");
    std::fs::copy(key, &into.key_file).expect("copy key");
}

/// `api_tls` files in `dir` holding a copy of the test server certificate, to be replaced.
fn replaceable_server_certificate(dir: &Path) -> ApiTls {
    let files = broker::tls_files();
    let api_tls = ApiTls {
        cert_file: dir.join("api.pem"),
        key_file: dir.join("api.key"),
    };
    install_certificate(&files.server_cert, &files.server_key, &api_tls);
    api_tls
}

#[test]
fn a_reloaded_certificate_serves_new_connections_and_a_bad_one_keeps_the_old() {
    let files = broker::tls_files();
    let certs = tempfile::tempdir().expect("temporary directory");
    let api_tls = replaceable_server_certificate(certs.path());
    let fx = Fixture::start_with(|c| c.api_tls = Some(api_tls.clone()));
    let server = fx.server.as_ref().expect("server runs");
    let ca = files.ca.to_str().expect("UTF-8");
    fx.operator(&["agents", "--ca-file", ca]).ok();

    std::fs::write(&api_tls.cert_file, "not a certificate\n").expect("write");
    let err = server.reload_tls().expect_err("garbage is refused");
    assert!(format!("{err:#}").contains("no certificate"), "{err:#}");
    fx.operator(&["agents", "--ca-file", ca]).ok();

    // The client certificate is the CA's too, but not one a server may present: once it is
    // loaded, handshakes fail, which shows the reload took.
    install_certificate(&files.client_cert, &files.client_key, &api_tls);
    server.reload_tls().expect("a well-formed pair reloads");
    fx.operator(&["agents", "--ca-file", ca])
        .fails_with("invalid peer certificate");
    install_certificate(&files.server_cert, &files.server_key, &api_tls);
    server.reload_tls().expect("reloads");
    fx.operator(&["agents", "--ca-file", ca]).ok();

    let plain = Fixture::start();
    let err = plain.server.as_ref().expect("server runs").reload_tls();
    assert!(
        format!("{:#}", err.expect_err("nothing to reload")).contains("plain HTTP"),
        "plain server"
    );
}

#[test]
fn sighup_reloads_the_certificate_of_a_running_server() {
    let files = broker::tls_files();
    let dir = tempfile::tempdir().expect("temporary directory");
    let api_tls = replaceable_server_certificate(dir.path());
    let (data_dir, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let port = free_port();
    let mut child = KillOnDrop(
        Command::new(flotilla_binary())
            .arg("server")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--tls-cert")
            .arg(&api_tls.cert_file)
            .arg("--tls-key")
            .arg(&api_tls.key_file)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("flotilla server starts"),
    );
    let url = format!("https://127.0.0.1:{port}");
    let agents = || {
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap_or_default();
        Command::new(flotilla_binary())
            .args(["agents", "--server", &url, "--ca-file"])
            .arg(&files.ca)
            .env("FLOTILLA_TOKEN", token.trim())
            .output()
            .expect("flotilla runs")
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; server log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let hangup = || {
        let sent = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status();
        assert!(sent.expect("kill runs").success());
    };
    wait_for("the server to answer", &|| agents().status.success());

    // A bad file is logged and the server goes on with the old certificate.
    std::fs::write(&api_tls.key_file, "not a key\n").expect("write");
    hangup();
    wait_for("the failed reload in the log", &|| {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("certificate not reloaded"))
    });
    assert!(
        agents().status.success(),
        "the old certificate still serves"
    );

    install_certificate(&files.client_cert, &files.client_key, &api_tls);
    hangup();
    wait_for("the new certificate", &|| {
        let out = agents();
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("invalid peer certificate")
    });

    let stopped = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    assert!(stopped.expect("kill runs").success());
    assert_eq!(child.0.wait().expect("server exits").code(), Some(0));
}

#[test]
fn a_server_with_unusable_tls_files_stops_before_it_listens_and_says_which() {
    let files = broker::tls_files();
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let cases = [
        (
            files.server_cert.clone(),
            files.client_key.clone(),
            "does not fit the certificate",
        ),
        (
            files.server_cert.clone(),
            dir.path().join("missing.key"),
            "api_tls.key_file",
        ),
        (
            files.server_key.clone(),
            files.server_key.clone(),
            "no certificate in the file",
        ),
    ];
    for (cert_file, key_file, reason) in cases {
        let mqtt_port = free_port();
        let config = ServerConfig {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().expect("address"),
            api_tls: Some(ApiTls {
                cert_file,
                key_file,
            }),
            mqtt: MqttConfig {
                listen: format!("127.0.0.1:{mqtt_port}").parse().expect("address"),
                ..MqttConfig::default()
            },
            ..ServerConfig::default()
        };
        let err = runtime
            .block_on(server::start(config))
            .expect_err("bad TLS files are refused");
        assert!(format!("{err:#}").contains(reason), "{reason}: {err:#}");
        // The embedded broker was not started either.
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err(),
            "{reason}: the broker listens"
        );
    }
}

#[test]
fn tokens_are_checked_and_the_api_messages_are_shown() {
    let fx = Fixture::start();
    let (file, _) = fx.signed_bundle();

    // The CLI asks for the token's role before it sends a byte of the bundle.
    fx.cli(Some(VIEWER_TOKEN), &["bundle", "push", &file])
        .fails_with("token \"viewer\" has role viewer; uploading bundles needs operator");
    fx.cli(
        Some(VIEWER_TOKEN),
        &[
            "rollout",
            "start",
            "--bundle",
            "x@1.0.0",
            "--selector",
            "",
            "--wave",
            "100%",
            "--bake",
            "1s",
        ],
    )
    .fails_with("this needs operator (HTTP 403)");
    fx.cli(None, &["agents"])
        .fails_with("missing bearer token (HTTP 401)");
    fx.cli(None, &["bundle", "push", &file])
        .fails_with("missing bearer token (HTTP 401)");
    fx.cli(Some("not-a-known-token"), &["rollout", "list"])
        .fails_with("unknown token (HTTP 401)");

    // Flags win over the environment.
    let flagged = fx.cli(
        Some("not-a-known-token"),
        &[
            "agents",
            "--json",
            "--token",
            VIEWER_TOKEN,
            "--server",
            &fx.url,
        ],
    );
    assert_eq!(flagged.ok().json(), serde_json::json!([]));
    let empty = fx.cli(Some(VIEWER_TOKEN), &["agents"]).ok();
    assert_eq!(empty.stdout, "no agents are known\n");
}

#[test]
fn rollout_start_without_matching_agents_shows_the_api_refusal() {
    let fx = Fixture::start();
    let (file, digest) = fx.signed_bundle();
    fx.operator(&["bundle", "push", &file]).ok();

    fx.operator(&[
        "rollout",
        "start",
        "--bundle",
        "tiny-mlp-raw@1.0.0",
        "--selector",
        "",
        "--wave",
        "1",
        "--wave",
        "100%",
        "--bake",
        "30s",
    ])
    .fails_with("matches no agent")
    .fails_with("(HTTP 400)");

    let spec = fx.file(
        "spec.toml",
        format!(
            "bundle = \"sha256:{digest}\"\nselector = \"site=berlin\"\n\
             [[waves]]\nsize = {{ percent = 100 }}\nbake_secs = 10\n"
        )
        .as_bytes(),
    );
    fx.operator(&["rollout", "start", "--spec", &spec])
        .fails_with("matches no agent")
        .fails_with("(HTTP 400)");

    fx.operator(&[
        "rollout",
        "start",
        "--bundle",
        "other@2.0.0",
        "--selector",
        "",
        "--wave",
        "1",
        "--bake",
        "1s",
    ])
    .fails_with("upload it first (HTTP 400)");

    let listed = fx.operator(&["rollout", "list", "--json"]).ok();
    assert_eq!(listed.json(), serde_json::json!([]));
}

#[test]
fn an_invalid_spec_is_refused_locally_before_anything_is_sent() {
    let fx = Fixture::start();
    let nowhere = format!("http://127.0.0.1:{}", free_port());

    let cumulative = fx.operator(&[
        "rollout",
        "start",
        "--server",
        &nowhere,
        "--bundle",
        "tiny-mlp-raw@1.0.0",
        "--selector",
        "",
        "--wave",
        "60%",
        "--wave",
        "50%",
        "--wave",
        "100%",
        "--bake",
        "1m",
    ]);
    cumulative.fails_with("not cumulative");

    let typo = fx.file(
        "typo.json",
        br#"{"bundle": "tiny-mlp-raw@1.0.0", "selector": "", "gate": {},
            "waves": [{"size": {"count": 1}, "bake_secs": 5}]}"#,
    );
    let run = fx.operator(&["rollout", "start", "--server", &nowhere, "--spec", &typo]);
    let run = run.fails_with("unknown field `gate`");
    assert!(run.stderr.contains("typo.json"), "{run:#?}");
    assert!(!run.stderr.contains("cannot reach"), "{run:#?}");

    let toml = fx.file(
        "bad.toml",
        b"bundle = \"tiny-mlp-raw@1.0.0\"\nselector = \"\"\nwaves = []\n",
    );
    fx.operator(&["rollout", "start", "--server", &nowhere, "--spec", &toml])
        .fails_with("at least one wave");
}

#[test]
fn bad_flags_are_usage_errors_not_panics() {
    let fx = Fixture::start();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "rollout",
                "start",
                "--bundle",
                "m@1.0.0",
                "--selector",
                "",
                "--wave",
                "half",
                "--bake",
                "1s",
            ],
            "neither a number of agents",
        ),
        (
            &[
                "rollout",
                "start",
                "--bundle",
                "m@1.0.0",
                "--selector",
                "",
                "--wave",
                "1",
                "--bake",
                "soon",
            ],
            "not a duration",
        ),
        (
            &[
                "rollout",
                "start",
                "--bundle",
                "not a ref",
                "--selector",
                "",
                "--wave",
                "1",
                "--bake",
                "1s",
            ],
            "parse bundle reference",
        ),
        (
            &[
                "rollout", "start", "--spec", "x.toml", "--bundle", "m@1.0.0",
            ],
            "cannot be used with",
        ),
        (&["rollout", "start", "--bundle", "m@1.0.0"], "required"),
    ];
    for (args, needle) in cases {
        let run = fx.operator(args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        assert!(run.stderr.contains(needle), "{args:?}: {run:#?}");
    }

    fx.operator(&["agents", "--server", "cp.local:8080"])
        .fails_with("unsupported scheme");
    fx.operator(&["agents", "--selector", "site in ("])
        .fails_with("bad selector")
        .fails_with("(HTTP 400)");
    fx.operator(&["events", "--limit", "0"])
        .fails_with("limit must be 1-1000 (HTTP 400)");
}

#[test]
fn an_unreachable_server_is_named_in_the_error() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let output = Command::new(flotilla_binary())
        .args(["agents", "--server", &url, "--token", "x"])
        .env_remove("FLOTILLA_SERVER")
        .output()
        .expect("flotilla runs");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    run.fails_with(&format!("cannot reach the server at {url}/"));
}

#[test]
fn agents_are_listed_a_page_at_a_time_and_filtered_by_presence() {
    let fx = Fixture::start();
    for (id, site) in [
        ("edge-5", "paris"),
        ("edge-1", "berlin"),
        ("edge-4", "berlin"),
        ("edge-2", "berlin"),
        ("edge-3", "paris"),
    ] {
        fx.add_agent(id, &[("site", site)]);
    }
    fx.agent_left("edge-2");
    let ids = |run: Run| -> Vec<String> {
        run.ok()
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|a| a["id"].as_str().expect("an id").to_owned())
            .collect()
    };

    // Two per request: the CLI follows the pages to the end, in id order.
    let all = fx.cli(
        Some(VIEWER_TOKEN),
        &["agents", "--page-size", "2", "--json"],
    );
    assert_eq!(ids(all), ["edge-1", "edge-2", "edge-3", "edge-4", "edge-5"]);
    let online = fx.cli(
        Some(VIEWER_TOKEN),
        &[
            "agents",
            "--online",
            "--selector",
            "site=berlin",
            "--page-size",
            "1",
            "--json",
        ],
    );
    assert_eq!(ids(online), ["edge-1", "edge-4"]);
    let offline = fx.cli(Some(VIEWER_TOKEN), &["agents", "--offline"]).ok();
    let lines: Vec<&str> = offline.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{offline:#?}");
    assert!(
        lines[1].starts_with("edge-2 ") && lines[1].contains(" no "),
        "{offline:#?}"
    );
    let none = fx
        .cli(
            Some(VIEWER_TOKEN),
            &["agents", "--offline", "--selector", "site=paris"],
        )
        .ok();
    assert_eq!(
        none.stdout,
        "no agents match the selector and are offline\n"
    );
    let both = fx.cli(Some(VIEWER_TOKEN), &["agents", "--online", "--offline"]);
    assert_eq!(both.code, Some(2), "{both:#?}");
    assert!(both.stderr.contains("cannot be used with"), "{both:#?}");

    // The API pages by `after` and refuses pages it would not serve.
    let get = |query: &str| -> (u16, Value) {
        let url = format!("{}/api/v1/agents?{query}", fx.url);
        fx.runtime.block_on(async {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(VIEWER_TOKEN)
                .send()
                .await
                .expect("server answers");
            let status = response.status().as_u16();
            (status, response.json().await.expect("JSON"))
        })
    };
    let (status, page) = get("limit=2&after=edge-2");
    assert_eq!(status, 200, "{page}");
    let page: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, ["edge-3", "edge-4"]);
    let (_, after_last) = get("after=edge-5");
    assert_eq!(after_last, serde_json::json!([]));
    for (bad, why) in [
        ("limit=0", "limit must be 1-1000"),
        ("limit=1001", "limit must be 1-1000"),
        (
            "online=maybe",
            "online: provided string was not `true` or `false`",
        ),
    ] {
        let (status, body) = get(bad);
        assert_eq!(status, 400, "{bad}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{bad}: {body}");
    }
}

#[test]
fn an_offline_agent_is_forgotten_from_the_cli_by_an_admin() {
    let fx = Fixture::start();
    fx.add_agent("edge-1", &[("site", "berlin")]);
    fx.add_agent("edge-2", &[("site", "berlin")]);
    fx.agent_left("edge-2");

    fx.cli(Some(ADMIN_TOKEN), &["agents", "forget", "edge-1"])
        .fails_with("agent edge-1 is online; stop it first (HTTP 409)");
    fx.operator(&["agents", "forget", "edge-2"])
        .fails_with("HTTP 403");
    fx.cli(Some(ADMIN_TOKEN), &["agents", "forget", "edge/2"])
        .fails_with("must be 1-64 characters");
    let forgot = fx
        .cli(Some(ADMIN_TOKEN), &["agents", "forget", "edge-2"])
        .ok();
    assert_eq!(forgot.stdout, "forgot edge-2\n");
    fx.cli(Some(ADMIN_TOKEN), &["agents", "forget", "edge-2"])
        .fails_with("HTTP 404");

    // What agents report reaches the operator's terminal escaped.
    fx.add_agent("edge-3", &[("note", "\u{1b}[2J\u{1b}]0;owned\u{7}")]);
    let listed = fx.cli(Some(VIEWER_TOKEN), &["agents"]).ok();
    assert!(!listed.stdout.contains('\u{1b}'), "{listed:#?}");
    assert!(
        listed
            .stdout
            .contains("note=\\u{1b}[2J\\u{1b}]0;owned\\u{7}"),
        "{listed:#?}"
    );
    fx.agent_left("edge-3");
    fx.cli(Some(ADMIN_TOKEN), &["agents", "forget", "edge-3"])
        .ok();

    let left = fx
        .cli(Some(VIEWER_TOKEN), &["agents", "--json"])
        .ok()
        .json();
    let ids: Vec<&str> = left
        .as_array()
        .expect("a list")
        .iter()
        .map(|a| a["id"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids, ["edge-1"]);
}

#[test]
fn agents_waiting_for_acceptance_are_listed_and_accepted_from_the_cli() {
    let fx = Fixture::start_with(|c| c.admission = Admission::Accept);
    let empty = fx.cli(Some(VIEWER_TOKEN), &["agents", "pending"]).ok();
    assert_eq!(empty.stdout, "no agents wait for acceptance\n");
    fx.add_agent("edge-1", &[("site", "berlin")]);
    let key = flotilla_tests::agent_key("edge-1").public().id().0.to_hex();

    let listed = fx.cli(Some(VIEWER_TOKEN), &["agents", "pending"]).ok();
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert!(
        lines[0].starts_with("AGENT ") && lines[0].contains("REGISTERED KEY"),
        "{listed:#?}"
    );
    assert!(
        lines[1].starts_with("edge-1 ")
            && lines[1].contains(&key)
            && lines[1].contains("none (new)")
            && lines[1].ends_with("site=berlin"),
        "{listed:#?}"
    );
    let json = fx
        .cli(Some(VIEWER_TOKEN), &["agents", "pending", "--json"])
        .ok()
        .json();
    assert_eq!(json[0]["key_id"], key.as_str());

    let admin = |args: &[&str]| fx.cli(Some(ADMIN_TOKEN), args);
    // A prefix could be matched by a key ground for it: only the whole id is taken.
    admin(&["agents", "accept", "edge-1", "--key", &key[..63]])
        .fails_with("--key must be the whole key id, 64 hex digits");
    admin(&[
        "agents",
        "accept",
        "edge-1",
        "--key",
        &format!("{}g", &key[..63]),
    ])
    .fails_with("--key must be the whole key id");
    let none = fx.cli(Some(VIEWER_TOKEN), &["agents", "approved"]).ok();
    assert_eq!(none.stdout, "no keys are approved ahead\n");
    let ahead = flotilla_tests::agent_key("edge-9").public().id().0.to_hex();
    let approved = admin(&["agents", "accept", "edge-9", "--key", &ahead]).ok();
    assert_eq!(
        approved.stdout,
        format!(
            "approved edge-9 ahead with key {}: it registers when it next connects with that key\n",
            &ahead[..16]
        )
    );
    let listed = fx.cli(Some(VIEWER_TOKEN), &["agents", "approved"]).ok();
    assert_eq!(listed.stdout, format!("AGENT   KEY\nedge-9  {ahead}\n"));
    // Its first birth, with that key, registers it although admission waits for an admin.
    fx.add_agent("edge-9", &[("site", "paris")]);
    fx.operator(&["agents", "accept", "edge-1", "--key", &key])
        .fails_with("HTTP 403");
    let accepted = admin(&["agents", "accept", "edge-1", "--key", &key.to_uppercase()]).ok();
    assert_eq!(
        accepted.stdout,
        format!("accepted edge-1 with key {}\n", &key[..16])
    );

    let agents = fx
        .cli(Some(VIEWER_TOKEN), &["agents", "--json"])
        .ok()
        .json();
    assert_eq!(agents[0]["id"], "edge-1");
    assert_eq!(agents[0]["online"], true);
    assert_eq!(agents[1]["id"], "edge-9");
    assert_eq!(agents[1]["online"], true);
}

#[test]
fn a_rollout_is_started_shown_and_steered_from_the_cli() {
    let fx = Fixture::start();
    let (file, digest) = fx.signed_bundle();
    fx.operator(&["bundle", "push", &file]).ok();
    fx.add_agent("edge-1", &[("site", "berlin")]);
    fx.add_agent("edge-2", &[("site", "berlin")]);
    fx.add_agent("edge-3", &[("site", "paris")]);

    let agents = fx
        .cli(Some(VIEWER_TOKEN), &["agents", "--selector", "site=berlin"])
        .ok();
    let lines: Vec<&str> = agents.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{agents:#?}");
    assert!(
        lines[0].starts_with("AGENT ") && lines[0].contains("LABELS"),
        "{agents:#?}"
    );
    assert!(
        lines[1].starts_with("edge-1 ") && lines[1].contains(" yes "),
        "{agents:#?}"
    );
    assert!(
        lines[1].ends_with("site=berlin") && lines[1].contains(" never "),
        "{agents:#?}"
    );

    let started = fx
        .operator(&[
            "rollout",
            "start",
            "--id",
            "canary-1",
            "--bundle",
            "tiny-mlp-raw@1.0.0",
            "--selector",
            "site=berlin",
            "--wave",
            "1",
            "--wave",
            "100%",
            "--bake",
            "30s",
            "--max-p99-ratio",
            "1.5",
            "--on-failure",
            "pause",
            "--max-error-rate",
            "0.02",
            "--stratify-by",
            "site",
            "--install-timeout",
            "2m",
        ])
        .ok();
    assert!(
        started.stdout.starts_with(&format!(
            "started rollout canary-1 of tiny-mlp-raw@1.0.0 (sha256:{}) to 2 agent(s)",
            &digest[..12]
        )),
        "{started:#?}"
    );
    assert!(
        started.stdout.contains("\n0     1       30s\n"),
        "{started:#?}"
    );
    assert!(
        started.stdout.contains("\n1     1       30s\n"),
        "{started:#?}"
    );

    let listed = fx
        .cli(Some(VIEWER_TOKEN), &["agents", "--json"])
        .ok()
        .json();
    let held: Vec<(&str, &Value)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), &a["rollout"]))
        .collect();
    assert_eq!(
        held,
        [
            ("edge-1", &Value::from("canary-1")),
            ("edge-2", &Value::from("canary-1")),
            ("edge-3", &Value::Null)
        ]
    );

    let view = fx
        .operator(&["rollout", "status", "canary-1", "--json"])
        .ok()
        .json();
    assert_eq!(view["id"], "canary-1");
    assert_eq!(view["spec"]["gates"]["max_p99_ratio"], 1.5);
    assert_eq!(view["spec"]["on_failure"], "pause");
    assert_eq!(view["spec"]["gates"]["max_error_rate"], 0.02);
    assert_eq!(view["spec"]["stratify_by"], "site");
    assert_eq!(view["spec"]["install_timeout_secs"], 120);
    assert_eq!(view["waves"][0]["bake_secs"], 30);

    let status = fx.operator(&["rollout", "status", "canary-1"]).ok();
    assert!(
        status.stdout.contains("rollout   canary-1\n"),
        "{status:#?}"
    );
    assert!(
        status.stdout.contains("selector  site=berlin\n"),
        "{status:#?}"
    );
    assert!(
        status.stdout.contains("wave 0  1 agent(s), bake 30s"),
        "{status:#?}"
    );
    assert!(
        status
            .stdout
            .contains("wave 1  1 agent(s), bake 30s: not started"),
        "{status:#?}"
    );
    assert!(status.stdout.contains("1 waiting"), "{status:#?}");

    let listed = fx.cli(Some(VIEWER_TOKEN), &["rollout", "list"]).ok();
    assert!(
        listed
            .stdout
            .lines()
            .nth(1)
            .is_some_and(|row| row.starts_with("canary-1 ") && row.contains("tiny-mlp-raw@1.0.0")),
        "{listed:#?}"
    );

    let paused = fx
        .operator(&[
            "rollout",
            "pause",
            "canary-1",
            "--reason",
            "maintenance window",
        ])
        .ok();
    assert!(
        paused
            .stdout
            .contains("pause requested; now paused in wave 0"),
        "{paused:#?}"
    );
    assert!(
        paused.stdout.contains("maintenance window (by ops)"),
        "{paused:#?}"
    );
    let resumed = fx.operator(&["rollout", "resume", "canary-1"]).ok();
    assert!(resumed.stdout.contains("now wave 0"), "{resumed:#?}");
    let aborted = fx
        .operator(&["rollout", "abort", "canary-1", "--reason", "enough"])
        .ok();
    assert!(aborted.stdout.contains("now aborted at"), "{aborted:#?}");

    let spec = fx.file(
        "paris.json",
        br#"{"bundle": "tiny-mlp-raw@1.0.0", "selector": "site=paris",
            "waves": [{"size": {"percent": 100}, "bake_secs": 60}]}"#,
    );
    let second = fx.operator(&["rollout", "start", "--spec", &spec]).ok();
    assert!(
        second
            .stdout
            .starts_with("started rollout tiny-mlp-raw-1.0.0-1 ")
            && second.stdout.contains(" to 1 agent(s)"),
        "{second:#?}"
    );
    let rolled = fx
        .operator(&[
            "rollout",
            "rollback",
            "tiny-mlp-raw-1.0.0-1",
            "--reason",
            "bad",
        ])
        .ok();
    assert!(
        rolled.stdout.contains("rollback requested; now rol"),
        "{rolled:#?}"
    );

    fx.cli(Some(VIEWER_TOKEN), &["rollout", "pause", "canary-1"])
        .fails_with("(HTTP 403)");
    fx.operator(&["rollout", "status", "no-such-rollout"])
        .fails_with("(HTTP 404)");

    let events = fx
        .operator(&["events", "--rollout", "canary-1", "--json"])
        .ok()
        .json();
    let events = events["events"].as_array().expect("events array").clone();
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e["rollout"] == "canary-1"),
        "{events:#?}"
    );
}

#[test]
fn events_are_listed_filtered_and_followed() {
    let fx = Fixture::start();
    let (file, _) = fx.signed_bundle();
    fx.operator(&["bundle", "push", &file]).ok();

    let table = fx
        .cli(Some(VIEWER_TOKEN), &["events", "--kind", "bundle_uploaded"])
        .ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{table:#?}");
    assert!(
        lines[0].starts_with("ID ") && lines[0].ends_with("MESSAGE"),
        "{table:#?}"
    );
    assert!(lines[1].contains("bundle_uploaded") && lines[1].contains("tiny-mlp-raw@1.0.0"));
    let none = fx
        .cli(Some(VIEWER_TOKEN), &["events", "--kind", "no_such_kind"])
        .ok();
    assert_eq!(none.stdout, "no events\n");

    let mut child = fx
        .command(
            Some(VIEWER_TOKEN),
            &["events", "--follow", "--json", "--kind", "bundle_uploaded"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("flotilla runs");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("an event line in time")
    };

    let first: Value = serde_json::from_str(&next()).expect("a JSON line");
    assert_eq!(first["kind"], "bundle_uploaded");
    assert!(first["message"]
        .as_str()
        .is_some_and(|m| m.contains("@1.0.0")));

    let newer = pack_signed_with(MODEL, &fx.keys.publisher, |dir| {
        set_release(dir, "1.1.0", 2)
    });
    let newer = fx.file("newer.bundle", &newer);
    fx.operator(&["bundle", "push", &newer]).ok();
    let second: Value = serde_json::from_str(&next()).expect("a JSON line");
    assert!(
        second["message"]
            .as_str()
            .is_some_and(|m| m.contains("@1.1.0")),
        "{second}"
    );
    assert!(second["id"].as_u64() > first["id"].as_u64());

    child.kill().expect("stop the follower");
    let _ = child.wait();

    let both = fx.cli(Some(VIEWER_TOKEN), &["events", "--follow", "--limit", "5"]);
    assert_eq!(both.code, Some(2), "{both:#?}");
    assert!(both.stderr.contains("cannot be used with"), "{both:#?}");
}
