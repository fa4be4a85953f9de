//! The agent's CPU pool: started by the first model that uses it and not before, shared by
//! every model, and doing the work of tract's large matrix products and of tokenising large
//! requests. A test binary of its own, because the pool is one per process.

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
        if !name.starts_with(flotilla_agent::runtime::CPU_POOL_THREAD) {
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

/// Runs `work` until the pool's threads have used CPU time, for at most 30 s.
fn pool_does(what: &str, mut work: impl FnMut()) {
    let idle = busy_ticks();
    let deadline = Instant::now() + Duration::from_secs(30);
    while busy_ticks() == idle {
        assert!(
            Instant::now() < deadline,
            "the pool's threads did no work in 30 s of {what}"
        );
        work();
    }
}

#[test]
fn models_share_one_pool_that_runs_large_products_and_tokenising() {
    assert!(pool_threads().is_empty(), "no pool threads before a model");

    let embed = load("tiny-bert-embed");
    let names: Vec<String> = pool_threads().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["cpu-pool-0", "cpu-pool-1"]);
    let _classify = load("tiny-bert-classify");
    assert_eq!(pool_threads().len(), 2, "a second model shares the pool");

    // A large request is tokenised on the pool, each text exactly as it would be alone.
    let text = embed.text().unwrap();
    let texts: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "text {i}: 今天天气很好, the quick brown fox {}",
                "jumps ".repeat(i)
            )
        })
        .collect();
    let batch = text.encode(&texts).unwrap();
    for (i, one) in texts.iter().enumerate() {
        let alone = text.encode(std::slice::from_ref(one)).unwrap();
        assert_eq!(batch.ids[i], alone.ids[0], "text {i}");
        assert_eq!(batch.offsets[i], alone.offsets[0], "text {i}");
    }
    pool_does("tokenising", || {
        text.encode(&texts).unwrap();
    });

    // 32 sequences of 128 tokens, tokenised once: products of 4096 rows, well above tract's
    // threading gate.
    let long = vec!["the quick brown fox jumps over the lazy dog ".repeat(20); 32];
    let long = text.encode(&long).unwrap();
    pool_does("inference", || {
        let inputs = text.model_inputs(&long, &embed.meta().inputs).unwrap();
        embed.infer(inputs).unwrap();
    });
}
