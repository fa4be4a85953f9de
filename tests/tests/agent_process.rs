//! The `flotilla-agent` binary as a process: standalone serving (with a config file, and its
//! retry of a failed backend), graceful SIGTERM, ONNX Runtime loaded only once a model needs
//! it, and the identity key it prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_tests::fleet::VIEWER_TOKEN;
use flotilla_tests::procs::{release, wait_for, Cluster, KillOnDrop, MODEL};
use flotilla_tests::{binary, free_port, pack_signed, write_public_key, TestKeys};

#[path = "../../agent/tests/support/onnxruntime.rs"]
mod onnxruntime;

#[tokio::test]
async fn standalone_serve_answers_and_exits_cleanly_on_sigterm() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("embed.fbundle");
    std::fs::write(&bundle, pack_signed("tiny-bert-embed", &keys.publisher)).unwrap();
    let trust = write_public_key(dir.path(), "publisher", &keys.publisher);
    let port = free_port();

    let mut child = Command::new(binary("flotilla-agent"))
        .args([
            "serve",
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The agent prints its address once it listens: wait for that line, not for a time.
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(60), line)
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("serving tiny-bert-embed@1.0.0"), "{line}");

    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://127.0.0.1:{port}/v1/embeddings"))
        .json(&serde_json::json!({"model": "tiny-bert-embed", "input": ["你好，世界", "hello"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["index"], 1);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn standalone_serve_refuses_an_untrusted_bundle() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("raw.fbundle");
    let stranger = flotilla_shared::SecretKey::from_seed([3; 32]);
    std::fs::write(&bundle, pack_signed("tiny-mlp-raw", &stranger)).unwrap();
    let trust = write_public_key(dir.path(), "publisher", &keys.publisher);

    let out = Command::new(binary("flotilla-agent"))
        .args([
            "serve",
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("signed only by unknown keys") && stderr.contains("raw.fbundle"),
        "{stderr}"
    );

    // No key at all is refused before the bundle is read.
    let out = Command::new(binary("flotilla-agent"))
        .args(["serve", "--bundle", bundle.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no trusted publisher key"), "{stderr}");
}

/// `flotilla-agent serve` of the tiny embedder with a config file, its log kept.
struct Serving {
    child: KillOnDrop,
    log: std::path::PathBuf,
    /// The model's `/v2` metadata once it answered.
    meta: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Serving {
    /// Starts it with `[inference]` holding `inference`, and waits until the model answers.
    async fn start(inference: &str) -> Self {
        let keys = TestKeys::default();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("embed.fbundle");
        std::fs::write(&bundle, pack_signed("tiny-bert-embed", &keys.publisher)).unwrap();
        write_public_key(dir.path(), "publisher", &keys.publisher);
        let port = free_port();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\nlisten = \"127.0.0.1:{port}\"\n\
                 [inference]\n{inference}\n\
                 [trust]\npublishers = [\"publisher.pub\"]\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("serve.log");
        let child = KillOnDrop(
            Command::new(binary("flotilla-agent"))
                .args(["serve", "--bundle", bundle.to_str().unwrap()])
                .args(["--config", config.to_str().unwrap()])
                .env("RUST_LOG", "info,ort=warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        // Listening where the file says.
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/v2/models/tiny-bert-embed");
        let meta = wait_for("the model's metadata", || async {
            let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
            response.json().await.map_err(|e| e.to_string())
        })
        .await;
        Self {
            child,
            log,
            meta,
            _dir: dir,
        }
    }

    /// How many times the log says `what`, and the log.
    fn logged(&self, what: &str) -> (usize, String) {
        let text = std::fs::read_to_string(&self.log).unwrap();
        (text.matches(what).count(), text)
    }

    /// Waits until the log says `what` `times` times.
    async fn wait_logged(&self, what: &str, times: usize) {
        wait_for(&format!("{times} × {what:?} in the log"), || async {
            match self.logged(what) {
                (n, _) if n >= times => Ok(()),
                (_, text) => Err(text),
            }
        })
        .await
    }

    /// SIGTERM; asserts the exit is clean.
    fn stop(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .unwrap();
        assert_eq!(self.child.0.wait().unwrap().code(), Some(0));
    }
}

/// `serve` has no heartbeat, yet a model that fell back must still be retried on its better
/// engine: here CUDA, asked of the CPU-only library, so every retry fails and is logged.
#[tokio::test]
async fn standalone_serve_takes_its_config_file_and_retries_a_failed_backend() {
    let Ok(library) = onnxruntime::library() else {
        // Fails with the reason unless FLOTILLA_SKIP_ORT=1.
        assert!(onnxruntime::runtime().is_none());
        return;
    };
    let serving = Serving::start(&format!(
        "onnxruntime_library = {library:?}\ngpu_providers = [\"cuda\"]\nretry_secs = 1"
    ))
    .await;
    let meta = &serving.meta;
    assert_eq!(meta["parameters"]["provider"], "cpu", "{meta:#}");
    let cause = meta["parameters"]["degraded"].as_str().unwrap_or_default();
    assert!(cause.contains("ort/cuda"), "{meta:#}");

    serving.wait_logged("better engine still fails", 2).await;
    assert_eq!(
        serving.logged("serving degraded").0,
        1,
        "each cause is logged once"
    );
    serving.stop();
}

/// A library that is there but does not load is not the same as no library: the operator
/// asked for ONNX Runtime, so the model runs on tract as a degradation, with the reason.
#[tokio::test]
async fn an_onnxruntime_library_that_does_not_load_is_reported_as_a_degradation() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&broken, b"not a shared library").unwrap();
    let serving = Serving::start(&format!("onnxruntime_library = {broken:?}")).await;
    let meta = &serving.meta;
    assert_eq!(meta["parameters"]["backend"], "tract", "{meta:#}");
    let cause = meta["parameters"]["degraded"].as_str().unwrap_or_default();
    assert!(
        cause.starts_with("ort/cpu: ")
            && cause.contains("cannot load onnxruntime library")
            && cause.ends_with("running on tract"),
        "{meta:#}"
    );
    serving.wait_logged("serving degraded", 1).await;
    let (_, log) = serving.logged("");
    assert!(
        !log.contains("models run on tract"),
        "not called absent: {log}"
    );
    serving.stop();
}

/// Whether the process `pid` has the ONNX Runtime library mapped.
fn maps_onnxruntime(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("process maps readable")
        .contains("libonnxruntime")
}

/// The library costs about 20 MB of resident memory, so an idle agent only checks that it is
/// there (and says so in its birth), and loads it with the first model that runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnxruntime_is_loaded_by_the_first_model_not_at_start() {
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        if std::env::var("FLOTILLA_SKIP_ORT").as_deref() == Ok("1") {
            eprintln!("skipping: ORT_DYLIB_PATH is not set and FLOTILLA_SKIP_ORT=1");
            return;
        }
        panic!("set ORT_DYLIB_PATH to the onnxruntime library (FLOTILLA_SKIP_ORT=1 skips)");
    }
    let mut cluster = Cluster::embedded();
    cluster.start_agent("edge-1", &[("site", "lab")]);
    cluster.wait_online(&["edge-1"]).await;
    let pid = cluster.agent("edge-1").pid().expect("agent runs");

    let (_, record) = cluster.get("/agents/edge-1", Some(VIEWER_TOKEN)).await;
    let backends = &record["capabilities"]["backends"];
    assert!(
        backends.as_array().unwrap().contains(&"ort".into()),
        "{record:#}"
    );
    assert!(!maps_onnxruntime(pid), "loaded with no model to run");

    cluster
        .install_everywhere(
            release(&cluster.keys, "1.0.0", 1, None),
            "1.0.0",
            &["edge-1"],
        )
        .await;
    let served = cluster.served("edge-1", MODEL).await.expect("serves");
    assert_eq!(served["parameters"]["backend"], "ort", "{served:#}");
    assert!(maps_onnxruntime(pid));
}

#[test]
fn the_identity_command_makes_the_key_once_and_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let identity = || {
        let out = Command::new(binary("flotilla-agent"))
            .args(["identity", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = identity();
    assert_eq!(identity(), first, "the key is made once");

    let public = flotilla_control_plane::keyfile::load_public(&data.join("identity.pub")).unwrap();
    let secret = flotilla_control_plane::keyfile::load_secret(&data.join("identity.key")).unwrap();
    assert_eq!(secret.public(), public);
    assert!(
        first.contains(&format!("key id   {}", public.id().0.to_hex())),
        "{first}"
    );
    assert!(first.contains(&hex::encode(public.to_bytes())), "{first}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
