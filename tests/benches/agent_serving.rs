//! Benchmark (not a test): the agent's served `/v1/embed` against the runtime in-process, and
//! the agent's idle resident memory with no model loaded. Prints a table.
//!
//! Run with `cargo bench -p flotilla-tests --bench agent_serving`. It uses all-MiniLM-L6-v2 when
//! `models/minilm/out` has been built (see the README), else the tiny test encoder.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::agent::ApiServer;
use flotilla_agent::api::{INFERENCE_TIME, QUEUE_TIME, TOKENIZATION_TIME};
use flotilla_agent::config::ApiConfig;
use flotilla_agent::install::{Installer, Trust};
use flotilla_agent::metrics::Metrics;
use flotilla_agent::serving::ModelSlot;
use flotilla_agent::store::Store;
use flotilla_shared::manifest::Backend;
use flotilla_tests::bench::{self, Timing};
use flotilla_tests::{binary, free_port, models_dir, pack_signed, write_public_key, TestKeys};

/// Alternating rounds of in-process and served requests.
const ROUNDS: usize = 6;

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank today.";

/// Mean milliseconds per request: the whole of each path, and the served one in the parts the
/// agent reports.
struct Breakdown {
    inprocess_ms: f64,
    served_ms: f64,
    tokenize_ms: f64,
    queue_ms: f64,
    model_ms: f64,
}

/// Requests one after another: throughput over the time they took in all.
fn summarise(samples: Vec<Duration>) -> Timing {
    Timing::of(&samples, samples.len(), samples.iter().sum())
}

fn main() {
    let minilm = models_dir().join("minilm/out");
    let model = if minilm.join("model.onnx").is_file() {
        minilm.to_str().unwrap().to_owned()
    } else {
        "tiny-bert-embed".to_owned()
    };
    let iterations = bench::setting("BENCH_ITERATIONS").unwrap_or(300);

    let keys = TestKeys::default();
    let bundle = pack_signed(&model, &keys.publisher);
    let scratch = tempfile::tempdir().unwrap();
    let trust = Trust {
        publishers: vec![keys.publisher.public()],
        threshold: 1,
        control_plane: None,
        key_set: 1,
        key_set_digest: None,
    };
    let installer = Installer::new(
        Store::open(scratch.path()).unwrap(),
        trust,
        vec![Backend::Tract],
    );
    let verified = installer.verify_new(&bundle).unwrap();
    let staged = installer.stage(&verified, &bundle).unwrap();
    let served = staged.served.clone();
    let name = served.manifest.id();

    // The runtime alone and the same request through the local API over loopback HTTP, one
    // client, in alternating rounds so that drift in the machine's speed (other load, clock
    // changes) falls on both paths alike.
    let texts = vec![SENTENCE.to_owned()];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (inprocess, served_timing, floor, breakdown) = runtime.block_on(async {
        let slot = Arc::new(ModelSlot::new(2));
        slot.activate(served.clone());
        let config = ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ApiConfig::default()
        };
        let api = ApiServer::start(&config, slot, Arc::new(Metrics::new()))
            .await
            .unwrap();
        let url = format!("http://{}/v1/embed", api.addr);
        let client = reqwest::Client::new();
        let body = serde_json::json!({"inputs": SENTENCE});
        // The agent's own account of each request, from its timing headers: tokenising,
        // queueing, model; whatever else the client saw was HTTP, JSON and thread hand-offs.
        let call = || async {
            let response = client.post(&url).json(&body).send().await.unwrap();
            assert!(response.status().is_success());
            let ms =
                |name: &str| -> f64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
            let parts = [ms(TOKENIZATION_TIME), ms(QUEUE_TIME), ms(INFERENCE_TIME)];
            response.bytes().await.unwrap();
            parts
        };
        for _ in 0..20 {
            served.model.run_texts(&texts).unwrap();
            call().await;
        }
        let per_round = iterations.div_ceil(ROUNDS);
        let mut inprocess = Vec::with_capacity(iterations);
        let mut http = Vec::with_capacity(iterations);
        let mut parts = [0f64; 3];
        for _ in 0..ROUNDS {
            for _ in 0..per_round {
                let t = Instant::now();
                served.model.run_texts(&texts).unwrap();
                inprocess.push(t.elapsed());
            }
            for _ in 0..per_round {
                let t = Instant::now();
                let said = call().await;
                http.push(t.elapsed());
                for (sum, ms) in parts.iter_mut().zip(said) {
                    *sum += ms;
                }
            }
        }
        // The HTTP floor: the same client and server with no model work, for diagnosis.
        let live = format!("http://{}/v2/health/live", api.addr);
        let mut floor = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            client
                .get(&live)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            floor.push(t.elapsed());
        }
        api.stop().await;
        let served = http.len() as f64;
        let mean = |samples: &[Duration]| {
            samples.iter().sum::<Duration>().as_secs_f64() * 1e3 / samples.len() as f64
        };
        let breakdown = Breakdown {
            inprocess_ms: mean(&inprocess),
            served_ms: mean(&http),
            tokenize_ms: parts[0] / served,
            queue_ms: parts[1] / served,
            model_ms: parts[2] / served,
        };
        (
            summarise(inprocess),
            summarise(http),
            summarise(floor),
            breakdown,
        )
    });

    let idle_rss = idle_resident_memory();

    let overhead = inprocess.per_second / served_timing.per_second - 1.0;
    println!();
    println!("agent serving benchmark: {name}, one sentence per request, {iterations} requests per path in {ROUNDS} alternating rounds, tract backend");
    println!("| path | req/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (label, t) in [
        ("runtime in-process", &inprocess),
        ("agent /v1/embed (HTTP)", &served_timing),
    ] {
        println!(
            "| {label} | {:.1} | {:.2} | {:.2} |",
            t.per_second, t.p50_ms, t.p99_ms
        );
    }
    println!("serving overhead: {:.1}% (target <= 5%)", overhead * 100.0);
    println!(
        "http floor (GET /v2/health/live, same client): p50 {:.3} ms, p99 {:.3} ms",
        floor.p50_ms, floor.p99_ms
    );
    let b = &breakdown;
    println!(
        "mean per request: in-process {:.3} ms; served {:.3} ms = tokenise {:.3} + queue {:.3} \
         + model {:.3} + the rest {:.3} (HTTP, JSON, hand-offs)",
        b.inprocess_ms,
        b.served_ms,
        b.tokenize_ms,
        b.queue_ms,
        b.model_ms,
        b.served_ms - b.tokenize_ms - b.queue_ms - b.model_ms,
    );
    match idle_rss {
        Some(kib) => println!(
            "agent idle resident memory, no model: {:.1} MB (target <= 15 MB)",
            kib as f64 / 1024.0
        ),
        None => println!("agent idle resident memory: not measurable on this platform"),
    }
}

/// Starts the release agent binary with no model and no reachable broker, waits until its API
/// answers, lets it settle, and reads VmRSS.
fn idle_resident_memory() -> Option<u64> {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::default();
    let trust = write_public_key(dir.path(), "publisher", &keys.publisher);
    let port = free_port();
    let mut child = Command::new(binary("flotilla-agent"))
        .args([
            "run",
            "--id",
            "bench-idle",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ])
        .args(["--broker", &format!("mqtt://127.0.0.1:{}", free_port())])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--trust",
            trust.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Settle: let start-up allocations be returned and a couple of heartbeats pass.
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok();
    let _ = child.kill();
    let _ = child.wait();
    status?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
