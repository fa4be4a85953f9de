//! Benchmark (not a test): all-MiniLM-L6-v2 at sequence length 128, batch 1, 8 and 32, side by
//! side: raw Python onnxruntime, the agent's `/v1/embed` on ONNX Runtime and on tract, and 64
//! concurrent one-sentence clients with batching on and off, with 128-token sentences and
//! again with short ones. Prints a table with the ratios.
//!
//! Needs the MiniLM build (see the README) and the onnxruntime wheel (for the library and the
//! raw baseline). Run with `cargo bench -p flotilla-tests --bench inference`; `BENCH_THREADS`
//! sets the thread count everywhere (default: the number of cores), `BENCH_ITERATIONS` the
//! requests per row (default 50), `BENCH_ROUNDS` the rounds they are split into (default 4),
//! `BENCH_PROVIDER` the ONNX Runtime provider both the raw and the served path run on: `cpu`
//! (default) or `cuda` (with the `onnxruntime-gpu` wheel, on a GPU host).
//! Each row's paths take turns, round by round, so that the host's speed drifting during the
//! run (it does, by several per cent) does not land on one path alone.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::agent::ApiServer;
use flotilla_agent::config::{ApiConfig, BatchingConfig};
use flotilla_agent::install::{Installer, Trust};
use flotilla_agent::metrics::Metrics;
use flotilla_agent::runtime::{GpuProviders, OrtRuntime, OrtSettings, Placement, Provider};
use flotilla_agent::serving::{ModelSlot, ServedModel};
use flotilla_agent::store::Store;
use flotilla_shared::manifest::Backend;
use flotilla_tests::bench::{self, Timing};
use flotilla_tests::{models_dir, pack_signed, TestKeys};

#[path = "../../agent/tests/support/onnxruntime.rs"]
mod onnxruntime;

/// A sentence of well over 128 tokens; the bundle truncates it to exactly 128.
fn long_sentence() -> String {
    "the quick brown fox jumps over the lazy dog near the river bank ".repeat(20)
}

/// A query-sized sentence: 16 tokens with [CLS] and [SEP].
const SHORT_SENTENCE: &str = "how do i reset the password on my home router after the update";

/// One path's request latencies, gathered over its rounds.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    /// Time the rounds took, summed.
    wall: Duration,
    /// Sentences served.
    sentences: usize,
}

impl Samples {
    fn add(&mut self, round: Samples) {
        self.latencies.extend(round.latencies);
        self.wall += round.wall;
        self.sentences += round.sentences;
    }

    fn timing(&self) -> Timing {
        Timing::of(&self.latencies, self.sentences, self.wall)
    }
}

/// Verifies and stages MiniLM for `backend` in `scratch`, the way an agent installs it; on
/// ONNX Runtime, with `provider` and nothing else.
fn stage(
    backend: Backend,
    provider: Provider,
    threads: usize,
    scratch: &std::path::Path,
) -> Arc<ServedModel> {
    let keys = TestKeys::default();
    let bundle = pack_signed(
        models_dir().join("minilm/out").to_str().unwrap(),
        &keys.publisher,
    );
    let trust = Trust {
        publishers: vec![keys.publisher.public()],
        threshold: 1,
        control_plane: None,
        key_set: 1,
        key_set_digest: None,
    };
    let mut placement = Placement::new(vec![backend]);
    placement.ort.intra_op_threads = threads;
    // Only the provider asked for: on a GPU host the CPU rows must not run on the GPU.
    placement.gpu_providers =
        GpuProviders::Listed(Some(provider).filter(|p| p.is_gpu()).into_iter().collect());
    let installer = Installer::new(Store::open(scratch).unwrap(), trust, vec![backend])
        .with_placement(placement);
    let verified = installer.verify_new(&bundle).unwrap();
    let served = installer.stage(&verified, &bundle).unwrap().served;
    let info = served.model.info();
    assert_eq!(info.backend, backend);
    if backend == Backend::Ort {
        // ONNX Runtime falls back to the CPU when a GPU provider fails; measuring that as
        // the GPU would be wrong.
        assert_eq!(
            info.provider,
            provider.as_str(),
            "asked for {}, runs on {} (on a GPU host, ORT_DYLIB_PATH must name the \
             onnxruntime-gpu wheel's library)",
            provider.as_str(),
            info.provider
        );
    }
    served
}

/// How a benchmark row loads the agent.
#[derive(Clone, Copy)]
struct Load<'a> {
    clients: usize,
    /// Sentences per request.
    batch: usize,
    /// Requests per client.
    iterations: usize,
    sentence: &'a str,
}

/// Serves `model` and runs `load` against it; returns each request's latency.
async fn serve(model: Arc<ServedModel>, batching: bool, load: Load<'_>) -> Samples {
    let Load {
        clients,
        batch,
        iterations,
        sentence,
    } = load;
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
    let body = serde_json::json!({ "inputs": vec![sentence; batch] });
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
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let wall = started.elapsed();
    api.stop().await;
    Samples {
        sentences: latencies.len() * batch,
        latencies,
        wall,
    }
}

/// Raw onnxruntime's run times at `batch`, on inputs of `tokens` tokens; its wall time is the
/// runs' sum, as `bench_ort.py` counts it.
fn raw_onnxruntime(
    provider: Provider,
    threads: usize,
    iterations: usize,
    batch: usize,
    tokens: usize,
) -> Samples {
    let script = models_dir().join("minilm/bench_ort.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--provider", provider.as_str()])
        .args(["--threads", &threads.to_string()])
        .args(["--batches", &batch.to_string()])
        .args(["--seq-len", &tokens.to_string()])
        .args(["--iterations", &iterations.to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let latencies: Vec<Duration> = line["samples_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ms| Duration::from_secs_f64(ms.as_f64().unwrap() / 1e3))
        .collect();
    Samples {
        wall: latencies.iter().sum(),
        sentences: latencies.len() * batch,
        latencies,
    }
}

fn main() {
    assert!(
        models_dir().join("minilm/out/model.onnx").is_file(),
        "build MiniLM first: python3 models/minilm/build.py"
    );
    let threads = bench::setting("BENCH_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let iterations = bench::setting("BENCH_ITERATIONS").unwrap_or(50);
    let provider = match std::env::var("BENCH_PROVIDER").as_deref() {
        Err(_) | Ok("cpu") => Provider::Cpu,
        Ok("cuda") => Provider::Cuda,
        Ok(other) => panic!("BENCH_PROVIDER is cpu or cuda, not {other:?}"),
    };
    let library = onnxruntime::library().expect("the onnxruntime library");
    OrtRuntime::init(&OrtSettings {
        library: Some(library),
        intra_op_threads: threads,
    })
    .unwrap();

    // Each backend's agent store, removed when the benchmark ends.
    let scratch = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ort = stage(Backend::Ort, provider, threads, scratch[0].path());
    let tract = stage(Backend::Tract, provider, threads, scratch[1].path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rounds = bench::setting("BENCH_ROUNDS").unwrap_or(4).max(1);
    let per_round = iterations.div_ceil(rounds);

    println!();
    println!(
        "all-MiniLM-L6-v2, sequence length 128, ONNX Runtime on {}, {threads} threads, {} \
         requests per row in {rounds} rounds; throughput in sentences/s, latency per request",
        provider.as_str(),
        per_round * rounds
    );
    println!("| batch | path | sent/s | p50 ms | p99 ms | ratio |");
    println!("|---:|---|---:|---:|---:|---|");
    let long = long_sentence();
    for batch in [1, 8, 32] {
        let load = Load {
            clients: 1,
            batch,
            iterations: per_round,
            sentence: &long,
        };
        let [mut raw, mut served_ort, mut served_tract] = <[Samples; 3]>::default();
        for _ in 0..rounds {
            raw.add(raw_onnxruntime(provider, threads, per_round, batch, 128));
            served_ort.add(runtime.block_on(serve(ort.clone(), false, load)));
            served_tract.add(runtime.block_on(serve(tract.clone(), false, load)));
        }
        let (raw, served_ort, served_tract) =
            (raw.timing(), served_ort.timing(), served_tract.timing());
        print_rows(
            batch,
            [
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
            ],
        );
    }

    let per_client = (iterations / 8).max(rounds).div_ceil(rounds);
    println!();
    println!(
        "64 concurrent one-sentence clients, {} requests each in {rounds} rounds, ort backend \
         on {}; raw onnxruntime's gain from batch 1 to batch 64 is the ceiling for any batching",
        per_client * rounds,
        provider.as_str()
    );
    println!("| tokens | path | sent/s | p50 ms | p99 ms | ratio |");
    println!("|---:|---|---:|---:|---:|---|");
    for (tokens, sentence) in [(128, long.as_str()), (16, SHORT_SENTENCE)] {
        let load = Load {
            clients: 64,
            batch: 1,
            iterations: per_client,
            sentence,
        };
        let [mut single, mut batch_64, mut off, mut on] = <[Samples; 4]>::default();
        for _ in 0..rounds {
            single.add(raw_onnxruntime(provider, threads, per_round, 1, tokens));
            // As many sentences as the 64 clients send in a round.
            batch_64.add(raw_onnxruntime(provider, threads, per_client, 64, tokens));
            off.add(runtime.block_on(serve(ort.clone(), false, load)));
            on.add(runtime.block_on(serve(ort.clone(), true, load)));
        }
        let [single, batch_64, off, on] = [single, batch_64, off, on].map(|s| s.timing());
        print_rows(
            tokens,
            [
                ("raw onnxruntime, batch 1", single, String::new()),
                (
                    "raw onnxruntime, batch 64",
                    batch_64,
                    format!("{:.2}x batch 1", batch_64.per_second / single.per_second),
                ),
                ("agent, batching off", off, String::new()),
                (
                    "agent, batching on",
                    on,
                    format!("{:.2}x off (target >= 3)", on.per_second / off.per_second),
                ),
            ],
        );
    }
}

/// Prints one markdown row per path, each starting with `key`.
fn print_rows<const N: usize>(key: usize, rows: [(&str, Timing, String); N]) {
    for (path, t, ratio) in rows {
        println!(
            "| {key} | {path} | {:.1} | {:.2} | {:.2} | {ratio} |",
            t.per_second, t.p50_ms, t.p99_ms
        );
    }
}
