//! Running a model on the best engine that works: an ordered list of targets (GPU ONNX Runtime,
//! CPU ONNX Runtime, tract), stepping down when an engine fails to load or to run, and back up
//! when a later retry of the better one succeeds.
//!
//! A request whose engine fails is run again on the next one, so a failing accelerator costs
//! latency, not answers. Validation happens before any engine sees the inputs, so what fails
//! here is the engine or the host, never the request.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_shared::manifest::Backend;
use flotilla_shared::tensor::Tensor;
use tracing::{info, warn};

use super::{Engine, EngineInfo, Provider, RuntimeError};

/// One way to run a model: a backend and, for ONNX Runtime, its execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// tract on the CPU.
    Tract,
    /// ONNX Runtime on a provider.
    Ort(Provider),
}

impl Target {
    /// The backend this target runs on.
    pub fn backend(self) -> Backend {
        match self {
            Self::Tract => Backend::Tract,
            Self::Ort(_) => Backend::Ort,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tract => f.write_str("tract"),
            Self::Ort(provider) => write!(f, "ort/{provider}"),
        }
    }
}

/// Builds the engine for a target; called again for each retry.
pub type EngineLoader = Box<dyn Fn(Target) -> Result<Arc<dyn Engine>, RuntimeError> + Send + Sync>;

/// Why a target is not the one running.
#[derive(Debug, Clone)]
struct Failure {
    cause: String,
    at: Instant,
}

#[derive(Default)]
struct State {
    /// Index of the target serving requests.
    active: usize,
    /// Loaded engines, by target index.
    engines: Vec<Option<Arc<dyn Engine>>>,
    /// Last failure of each target, by index.
    failures: Vec<Option<Failure>>,
}

/// The targets of one model, best first, and the one in use.
pub struct EngineLadder {
    targets: Vec<Target>,
    loader: EngineLoader,
    state: Mutex<State>,
    /// Held while an engine is being built, so concurrent failures load the next one once.
    loading: Mutex<()>,
}

impl std::fmt::Debug for EngineLadder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineLadder")
            .field("targets", &self.targets)
            .field("active", &self.state().active)
            .finish()
    }
}

impl EngineLadder {
    /// Loads the first target that loads, remembering why the better ones did not. Fails with
    /// the last target's error when none loads.
    pub fn load(targets: Vec<Target>, loader: EngineLoader) -> Result<Self, RuntimeError> {
        let Some(&last) = targets.last() else {
            return Err(RuntimeError::NoTarget);
        };
        let mut state = State {
            active: 0,
            engines: targets.iter().map(|_| None).collect(),
            failures: targets.iter().map(|_| None).collect(),
        };
        for (index, target) in targets.iter().enumerate() {
            match loader(*target) {
                Ok(engine) => {
                    state.active = index;
                    state.engines[index] = Some(engine);
                    break;
                }
                Err(error) if *target == last => return Err(error),
                Err(error) => {
                    warn!(%target, %error, "engine failed to load; trying the next");
                    state.failures[index] = Some(Failure {
                        cause: format!("{target}: {error}"),
                        at: Instant::now(),
                    });
                }
            }
        }
        Ok(Self {
            targets,
            loader,
            state: Mutex::new(state),
            loading: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few indices and handles, consistent after any panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The targets, best first.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The target serving requests now.
    pub fn active(&self) -> Target {
        self.targets[self.state().active]
    }

    /// What the engine in use reports.
    pub fn info(&self) -> EngineInfo {
        let state = self.state();
        state.engines[state.active]
            .as_ref()
            .expect("invariant: the active target has an engine")
            .info()
    }

    /// Why the best target is not the one running, if it is not.
    pub fn degradation(&self) -> Option<String> {
        let state = self.state();
        let failure = state.failures[..state.active].iter().flatten().next()?;
        Some(format!(
            "{}; running on {}",
            failure.cause, self.targets[state.active]
        ))
    }

    /// Runs on the active engine; when it fails, steps down and runs the same inputs on the
    /// next engine that loads. Only the last engine's failure reaches the caller.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        loop {
            let (index, engine) = {
                let state = self.state();
                let engine = state.engines[state.active]
                    .clone()
                    .expect("invariant: the active target has an engine");
                (state.active, engine)
            };
            if index + 1 == self.targets.len() {
                return engine.run(inputs);
            }
            let error = match engine.run(inputs.clone()) {
                Ok(outputs) => return Ok(outputs),
                Err(error) => error,
            };
            if !self.step_down(index, &error) {
                return Err(error);
            }
        }
    }

    /// Moves from target `from` to the next one that loads; returns whether one did (or
    /// another request already moved on).
    fn step_down(&self, from: usize, error: &RuntimeError) -> bool {
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if self.state().active != from {
            return true;
        }
        let target = self.targets[from];
        warn!(%target, %error, "engine failed while running; stepping down");
        self.state().failures[from] = Some(Failure {
            cause: format!("{target} failed while running: {error}"),
            at: Instant::now(),
        });

        for next in from + 1..self.targets.len() {
            if self.state().engines[next].is_some() {
                self.state().active = next;
                return true;
            }
            let target = self.targets[next];
            match (self.loader)(target) {
                Ok(engine) => {
                    let mut state = self.state();
                    state.engines[next] = Some(engine);
                    state.active = next;
                    info!(%target, "now running on the fallback engine");
                    return true;
                }
                Err(error) => {
                    warn!(%target, %error, "fallback engine failed to load");
                    self.state().failures[next] = Some(Failure {
                        cause: format!("{target}: {error}"),
                        at: Instant::now(),
                    });
                }
            }
        }
        false
    }

    /// Tries again each better target whose last failure is at least `after` old, best first;
    /// switches to the first that loads and returns it. Blocking; a retry already running
    /// elsewhere makes this return `None` at once.
    pub fn retry(&self, after: Duration) -> Option<Target> {
        let _loading = self.loading.try_lock().ok()?;
        let active = self.state().active;
        for index in 0..active {
            let due = self.state().failures[index]
                .as_ref()
                .is_none_or(|f| f.at.elapsed() >= after);
            if !due {
                continue;
            }
            let target = self.targets[index];
            match (self.loader)(target) {
                Ok(engine) => {
                    let mut state = self.state();
                    state.engines[index] = Some(engine);
                    for failure in &mut state.failures[index..] {
                        *failure = None;
                    }
                    state.active = index;
                    info!(%target, "better engine works again; switched back");
                    return Some(target);
                }
                Err(error) => {
                    warn!(%target, %error, "better engine still fails");
                    self.state().failures[index] = Some(Failure {
                        cause: format!("{target}: {error}"),
                        at: Instant::now(),
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use flotilla_shared::tensor::TensorData;

    use super::*;

    /// An engine that answers with its name, or fails while `broken` is set.
    struct Scripted {
        name: &'static str,
        broken: Arc<AtomicBool>,
        runs: Arc<AtomicUsize>,
    }

    impl Engine for Scripted {
        fn info(&self) -> EngineInfo {
            EngineInfo {
                backend: Backend::Ort,
                provider: self.name.into(),
            }
        }

        fn run(&self, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            if self.broken.load(Ordering::SeqCst) {
                return Err(RuntimeError::Run(format!("{} device lost", self.name)));
            }
            Ok(vec![Tensor::new(
                self.name,
                vec![1],
                TensorData::Fp32(vec![1.0]),
            )
            .unwrap()])
        }
    }

    struct Rig {
        gpu_broken: Arc<AtomicBool>,
        gpu_loads: Arc<AtomicBool>,
        gpu_runs: Arc<AtomicUsize>,
        ladder: EngineLadder,
    }

    fn rig(gpu_loads_at_first: bool) -> Result<Rig, RuntimeError> {
        let gpu_broken = Arc::new(AtomicBool::new(false));
        let gpu_loads = Arc::new(AtomicBool::new(gpu_loads_at_first));
        let gpu_runs = Arc::new(AtomicUsize::new(0));
        let (broken, loads, runs) = (gpu_broken.clone(), gpu_loads.clone(), gpu_runs.clone());
        let loader: EngineLoader = Box::new(move |target| {
            let name = match target {
                Target::Ort(Provider::Cuda) if !loads.load(Ordering::SeqCst) => {
                    return Err(RuntimeError::ProviderUnavailable {
                        provider: Provider::Cuda,
                        reason: "no CUDA device".into(),
                    })
                }
                Target::Ort(Provider::Cuda) => "cuda",
                _ => "cpu",
            };
            Ok(Arc::new(Scripted {
                name,
                broken: if name == "cuda" {
                    broken.clone()
                } else {
                    Default::default()
                },
                runs: if name == "cuda" {
                    runs.clone()
                } else {
                    Default::default()
                },
            }) as Arc<dyn Engine>)
        });
        let ladder = EngineLadder::load(vec![Target::Ort(Provider::Cuda), Target::Tract], loader)?;
        Ok(Rig {
            gpu_broken,
            gpu_loads,
            gpu_runs,
            ladder,
        })
    }

    fn answer(ladder: &EngineLadder) -> String {
        ladder.run(vec![]).unwrap()[0].name.clone()
    }

    #[test]
    fn a_provider_that_fails_to_load_leaves_the_model_on_the_next_target_degraded() {
        let rig = rig(false).unwrap();
        assert_eq!(rig.ladder.active(), Target::Tract);
        let cause = rig.ladder.degradation().unwrap();
        assert!(
            cause.contains("ort/cuda") && cause.contains("no CUDA device"),
            "{cause}"
        );
        assert!(cause.ends_with("running on tract"), "{cause}");
        assert_eq!(answer(&rig.ladder), "cpu");
    }

    #[test]
    fn a_run_failure_is_answered_by_the_fallback_and_the_retry_climbs_back() {
        let rig = rig(true).unwrap();
        assert_eq!(answer(&rig.ladder), "cuda");
        assert!(rig.ladder.degradation().is_none());

        rig.gpu_broken.store(true, Ordering::SeqCst);
        assert_eq!(answer(&rig.ladder), "cpu", "the failed request is answered");
        assert_eq!(rig.ladder.active(), Target::Tract);
        let cause = rig.ladder.degradation().unwrap();
        assert!(cause.contains("device lost"), "{cause}");
        let runs = rig.gpu_runs.load(Ordering::SeqCst);
        assert_eq!(answer(&rig.ladder), "cpu");
        assert_eq!(
            rig.gpu_runs.load(Ordering::SeqCst),
            runs,
            "no more tries on cuda"
        );

        // Not due yet: the failure is fresh.
        assert_eq!(rig.ladder.retry(Duration::from_secs(3600)), None);
        // Due, but the device still fails to load.
        rig.gpu_loads.store(false, Ordering::SeqCst);
        assert_eq!(rig.ladder.retry(Duration::ZERO), None);
        assert!(rig.ladder.degradation().unwrap().contains("no CUDA device"));
        // Due, and it works again.
        rig.gpu_loads.store(true, Ordering::SeqCst);
        rig.gpu_broken.store(false, Ordering::SeqCst);
        assert_eq!(
            rig.ladder.retry(Duration::ZERO),
            Some(Target::Ort(Provider::Cuda))
        );
        assert!(rig.ladder.degradation().is_none());
        assert_eq!(answer(&rig.ladder), "cuda");
    }

    #[test]
    fn the_last_target_failing_reaches_the_caller() {
        let loader: EngineLoader = Box::new(|_| {
            Err(RuntimeError::LoadModel {
                path: "m.onnx".into(),
                reason: "bad graph".into(),
            })
        });
        let err = EngineLadder::load(vec![Target::Ort(Provider::Cpu), Target::Tract], loader)
            .unwrap_err();
        assert!(err.to_string().contains("bad graph"), "{err}");
        let none = EngineLadder::load(vec![], Box::new(|_| unreachable!())).unwrap_err();
        assert!(matches!(none, RuntimeError::NoTarget), "{none}");
    }
}
