//! tract's thread pool: started by the first tract model and not before, shared by every tract
//! model, and doing the work of large matrix products. A test binary of its own, because the
//! pool is one per process.

use std::time::{Duration, Instant};

use flotilla_agent::runtime::{Model, OrtSettings, Target};
use flotilla_shared::manifest::Truncation;

#[path = "support/models.rs"]
mod models;
use models::{meta, models};

/// The pool's threads in this process: their names, and the CPU time each has used, in ticks.
fn pool_threads() -> Vec<(String, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !name.starts_with(flotilla_agent::runtime::TRACT_POOL_THREAD) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // After the parenthesised name: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        threads.push((name.trim().to_owned(), ticks));
    }
    threads.sort();
    threads
}

fn busy_ticks() -> u64 {
    pool_threads().iter().map(|(_, ticks)| ticks).sum()
}

fn load(model: &str) -> Model {
    let settings = OrtSettings {
        library: None,
        intra_op_threads: 2,
    };
    let meta = meta(model, Truncation::Truncate, 128);
    Model::load_on(&models().join(model), &meta, vec![Target::Tract], &settings).unwrap()
}

#[test]
fn tract_models_share_one_pool_that_runs_their_large_products() {
    assert!(pool_threads().is_empty(), "no pool threads before a model");

    let embed = load("tiny-bert-embed");
    let names: Vec<String> = pool_threads().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["tract-pool-0", "tract-pool-1"]);
    let _classify = load("tiny-bert-classify");
    assert_eq!(pool_threads().len(), 2, "a second model shares the pool");

    // 32 sequences of 128 tokens: products of 4096 rows, well above tract's threading gate.
    let texts = vec!["the quick brown fox jumps over the lazy dog ".repeat(20); 32];
    let idle = busy_ticks();
    let deadline = Instant::now() + Duration::from_secs(30);
    while busy_ticks() == idle {
        assert!(
            Instant::now() < deadline,
            "the pool's threads did no work in 30 s of inference"
        );
        embed.run_texts(&texts).unwrap();
    }
}
