//! Benchmark (not a test): bytes the control plane publishes when N agents download one bundle
//! at the same time. Chunks are answered on a per-bundle topic every downloader listens to, and a
//! part published within the share window is not published again, so egress should stay near
//! one copy of the bundle however many agents download it. Prints a table.
//!
//! Run with `cargo bench -p flotilla-tests --bench control_plane_egress`.

use std::time::Instant;

use flotilla_tests::fleet::Fleet;
use flotilla_tests::procs::release;

use flotilla_tests::procs::MODEL;
const CHUNK: u32 = 16 * 1024;

fn chunk_bytes(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("flotilla_chunk_bytes_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn run(downloaders: usize) -> (u64, u64, f64) {
    let mut fleet = Fleet::start().await;
    let ids: Vec<String> = (0..downloaders).map(|i| format!("edge-{i}")).collect();
    for id in &ids {
        fleet.start_agent(id, &[("site", "bench")]);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    fleet.wait_online(&refs).await;
    let bundle = release(&fleet.keys, "1.0.0", 1, Some(CHUNK));
    let size = bundle.len() as u64;
    fleet.upload(bundle).await;
    let started = Instant::now();
    fleet.roll_out_everywhere("1.0.0").await;
    let seconds = started.elapsed().as_secs_f64();
    let metrics = reqwest::get(format!("http://{}/metrics", fleet.server().api_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let published = chunk_bytes(&metrics);
    fleet.shutdown().await;
    (size, published, seconds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "control plane egress: {MODEL}, {} KiB chunks, all downloaders in one wave",
        CHUNK / 1024
    );
    println!();
    println!(
        "{:>11}  {:>12}  {:>15}  {:>17}  {:>14}  {:>8}",
        "downloaders",
        "bundle bytes",
        "bytes published",
        "copies of bundle",
        "N separate",
        "seconds"
    );
    for n in [1, 2, 4, 8] {
        let (size, published, seconds) = run(n).await;
        println!(
            "{:>11}  {:>12}  {:>15}  {:>17.2}  {:>14}  {:>8.1}",
            n,
            size,
            published,
            published as f64 / size as f64,
            size * n as u64,
            seconds
        );
    }
}
