//! Benchmark (not a test): all-MiniLM-L6-v2 at sequence length 128, batch 1, 8 and 32, side by
//! side: raw Python onnxruntime, the agent's `/v1/embed` on ONNX Runtime and on tract, and 64
//! concurrent one-sentence clients with batching on and off. Prints a table with the ratios.
//!
//! Needs the MiniLM build (see the README) and the onnxruntime wheel (for the library and the
//! raw baseline). Run with `cargo bench -p flotilla-tests --bench inference`; `BENCH_THREADS`
//! sets the thread count everywhere (default: the number of cores), `BENCH_ITERATIONS` the
//! requests per row (default 50).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::agent::ApiServer;
use flotilla_agent::config::{ApiConfig, BatchingConfig};
use flotilla_agent::install::{Installer, Trust};
use flotilla_agent::metrics::Metrics;
use flotilla_agent::runtime::{OrtRuntime, OrtSettings, Placement};
use flotilla_agent::serving::{ModelSlot, ServedModel};
use flotilla_agent::store::Store;
use flotilla_shared::manifest::Backend;
use flotilla_tests::{models_dir, pack_signed, TestKeys};

#[path = "../../agent/tests/support/onnxruntime.rs"]
mod onnxruntime;

/// A sentence of well over 128 tokens; the bundle truncates it to exactly 128.
fn sentence() -> String {
    "the quick brown fox jumps over the lazy dog near the river bank ".repeat(20)
}

#[derive(Clone, Copy)]
struct Timing {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarise(mut samples: Vec<Duration>, items_per_sample: usize, wall: Duration) -> Timing {
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Timing {
        per_second: (samples.len() * items_per_sample) as f64 / wall.as_secs_f64(),
        p50_ms: pick(0.50).as_secs_f64() * 1e3,
        p99_ms: pick(0.99).as_secs_f64() * 1e3,
    }
}

/// Verifies and stages MiniLM for `backend` in `scratch`, the way an agent installs it.
fn stage(backend: Backend, threads: usize, scratch: &std::path::Path) -> Arc<ServedModel> {
    let keys = TestKeys::default();
    let bundle = pack_signed(
        models_dir().join("minilm/out").to_str().unwrap(),
        &keys.publisher,
    );
    let trust = Trust {
        publishers: vec![keys.publisher.public()],
        threshold: 1,
        control_plane: None,
    };
    let mut placement = Placement::new(vec![backend]);
    placement.ort.intra_op_threads = threads;
    let installer = Installer::new(Store::open(scratch).unwrap(), trust, vec![backend])
        .with_placement(placement);
    let verified = installer.verify_new(&bundle).unwrap();
    let served = installer.stage(&verified, &bundle).unwrap().served;
    assert_eq!(served.model.info().backend, backend);
    served
}

/// Serves `model` and runs `clients` concurrent clients, each sending `iterations` requests of
/// `batch` sentences; returns sentences per second and per-request latency.
async fn serve(
    model: Arc<ServedModel>,
    batching: bool,
    clients: usize,
    batch: usize,
    iterations: usize,
) -> Timing {
    let slot = Arc::new(ModelSlot::new(clients.max(2)));
    slot.activate(model);
    let config = ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        batching: BatchingConfig {
            enabled: batching,
            ..BatchingConfig::default()
        },
        ..ApiConfig::default()
    };
    let api = ApiServer::start(&config, slot, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let url = format!("http://{}/v1/embed", api.addr);
    let body = serde_json::json!({ "inputs": vec![sentence(); batch] });
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(iterations);
                for _ in 0..iterations {
                    let t = Instant::now();
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                    r.bytes().await.unwrap();
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    let wall = started.elapsed();
    api.stop().await;
    summarise(samples, batch, wall)
}

fn raw_onnxruntime(threads: usize, iterations: usize) -> Vec<(usize, Timing)> {
    let script = models_dir().join("minilm/bench_ort.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--threads", &threads.to_string(), "--batches", "1,8,32"])
        .args(["--iterations", &iterations.to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = Timing {
                per_second: v["per_second"].as_f64().unwrap(),
                p50_ms: v["p50_ms"].as_f64().unwrap(),
                p99_ms: v["p99_ms"].as_f64().unwrap(),
            };
            (v["batch"].as_u64().unwrap() as usize, t)
        })
        .collect()
}

fn main() {
    assert!(
        models_dir().join("minilm/out/model.onnx").is_file(),
        "build MiniLM first: python3 models/minilm/build.py"
    );
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let library = onnxruntime::library().expect("the onnxruntime library");
    OrtRuntime::init(&OrtSettings {
        library: Some(library),
        intra_op_threads: threads,
    })
    .unwrap();

    let raw = raw_onnxruntime(threads, iterations);
    // Each backend's agent store, removed when the benchmark ends.
    let scratch = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ort = stage(Backend::Ort, threads, scratch[0].path());
    let tract = stage(Backend::Tract, threads, scratch[1].path());
    let runtime = tokio::runtime::Runtime::new().unwrap();

    println!();
    println!(
        "all-MiniLM-L6-v2, sequence length 128, {threads} threads, {iterations} requests per row; \
         throughput in sentences/s, latency per request"
    );
    println!("| batch | path | sent/s | p50 ms | p99 ms | ratio |");
    println!("|---:|---|---:|---:|---:|---|");
    for (batch, raw) in raw {
        let served_ort = runtime.block_on(serve(ort.clone(), false, 1, batch, iterations));
        let served_tract = runtime.block_on(serve(tract.clone(), false, 1, batch, iterations));
        let rows = [
            ("raw onnxruntime (python)", raw, String::new()),
            (
                "agent /v1/embed, ort",
                served_ort,
                format!(
                    "{:.2}x raw (target >= 0.95)",
                    served_ort.per_second / raw.per_second
                ),
            ),
            (
                "agent /v1/embed, tract",
                served_tract,
                format!(
                    "{:.2}x ort (target >= 0.5)",
                    served_tract.per_second / served_ort.per_second
                ),
            ),
        ];
        for (path, t, ratio) in rows {
            println!(
                "| {batch} | {path} | {:.1} | {:.2} | {:.2} | {ratio} |",
                t.per_second, t.p50_ms, t.p99_ms
            );
        }
    }

    let per_client = (iterations / 8).max(2);
    let off = runtime.block_on(serve(ort.clone(), false, 64, 1, per_client));
    let on = runtime.block_on(serve(ort.clone(), true, 64, 1, per_client));
    println!();
    println!("64 concurrent one-sentence clients, {per_client} requests each, ort backend");
    println!("| batching | sent/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (label, t) in [("off", off), ("on", on)] {
        println!(
            "| {label} | {:.1} | {:.2} | {:.2} |",
            t.per_second, t.p50_ms, t.p99_ms
        );
    }
    println!(
        "batching speed-up: {:.2}x (target >= 3)",
        on.per_second / off.per_second
    );
}
