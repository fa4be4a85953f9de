//! The agent's one CPU pool beside ONNX Runtime's own: tract splits large matrix products over
//! it, and large text requests are tokenised on it, so CPU work outside ONNX Runtime keeps to
//! the same thread budget.

use std::sync::{Arc, Mutex};

use tract_linalg::multithread::Executor;

use super::RuntimeError;

/// How the pool's threads are named (then their index), as `top -H` shows them.
pub const POOL_THREAD: &str = "cpu-pool-";

/// The pool, started by the first model that needs it, so an idle agent has no such threads,
/// and of a fixed size however many models are loaded: the first size asked for is the one
/// kept (0: one thread per core). Rayon's idle workers sleep after a brief spin. One thread
/// needs no pool: the work then runs on the caller's thread.
pub fn shared(threads: usize) -> Result<Executor, RuntimeError> {
    static POOL: Mutex<Option<Executor>> = Mutex::new(None);
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(executor) = pool.as_ref() {
        return Ok(executor.clone());
    }
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let executor = if threads == 1 {
        Executor::SingleThread
    } else {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("{POOL_THREAD}{i}"))
            .build()
            .map_err(|e| RuntimeError::CpuPool {
                threads,
                reason: e.to_string(),
            })?;
        Executor::MultiThread(Arc::new(built))
    };
    Ok(pool.insert(executor).clone())
}
