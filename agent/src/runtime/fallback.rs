//! Running a model on the best engine that works: an ordered list of targets (GPU ONNX Runtime,
//! CPU ONNX Runtime, tract), stepping down when an engine fails to load or to run, and back up
//! when a later retry of the better one succeeds.
//!
//! A request whose engine fails is run again on the next one, so a failing accelerator costs
//! latency, not answers. Validation happens before any engine sees the inputs, but it cannot
//! catch everything (a token id past the vocabulary, say): inputs that every engine fails on
//! are the request's fault, and leave the model where it is.

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

    /// Runs on the active engine. When it fails, the same inputs go to the next engines in
    /// turn and the model steps down to the first that answers them, so a failing engine costs
    /// latency, not answers. When every engine that runs fails too, the inputs are at fault,
    /// not the engine: the model stays where it is and the caller gets
    /// [`RuntimeError::InputRejected`] with each engine's reason.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let (from, engine) = {
            let state = self.state();
            let engine = state.engines[state.active]
                .clone()
                .expect("invariant: the active target has an engine");
            (state.active, engine)
        };
        if from + 1 == self.targets.len() {
            return engine.run(inputs);
        }
        match engine.run(inputs.clone()) {
            Ok(outputs) => Ok(outputs),
            Err(error) => self.fall_back(from, inputs, error),
        }
    }

    /// Runs `inputs`, which failed on target `from` with `error`, on each worse target until
    /// one answers, and steps down to it.
    fn fall_back(
        &self,
        from: usize,
        mut inputs: Vec<Tensor>,
        error: RuntimeError,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let target = self.targets[from];
        warn!(%target, %error, "engine failed while running; trying the next");
        // Why each target tried is no good, to record if the model steps down past it.
        let mut failures = vec![(from, format!("{target} failed while running: {error}"))];
        // What the engines that did run said about these inputs.
        let mut rejections = vec![format!("{target}: {error}")];
        for next in from + 1..self.targets.len() {
            let target = self.targets[next];
            let engine = match self.loaded(next) {
                Ok(engine) => engine,
                Err(load_error) => {
                    warn!(%target, error = %load_error, "fallback engine failed to load");
                    failures.push((next, format!("{target}: {load_error}")));
                    continue;
                }
            };
            let attempt = if next + 1 == self.targets.len() {
                std::mem::take(&mut inputs)
            } else {
                inputs.clone()
            };
            match engine.run(attempt) {
                Ok(outputs) => {
                    self.step_down(from, next, failures);
                    return Ok(outputs);
                }
                Err(next_error) => {
                    failures.push((next, format!("{target} failed while running: {next_error}")));
                    rejections.push(format!("{target}: {next_error}"));
                }
            }
        }
        if rejections.len() == 1 {
            // No other engine could run them: nothing tells the inputs from the engine.
            return Err(error);
        }
        let target = self.targets[from];
        warn!(%target, "every engine failed on the same inputs; staying on this one");
        Err(RuntimeError::InputRejected(rejections.join("; ")))
    }

    /// The engine of target `index`, loaded now if it was not.
    fn loaded(&self, index: usize) -> Result<Arc<dyn Engine>, RuntimeError> {
        let cached = self.state().engines[index].clone();
        if let Some(engine) = cached {
            return Ok(engine);
        }
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have loaded it while this one waited.
        let cached = self.state().engines[index].clone();
        if let Some(engine) = cached {
            return Ok(engine);
        }
        let engine = (self.loader)(self.targets[index])?;
        self.state().engines[index] = Some(engine.clone());
        Ok(engine)
    }

    /// Moves from target `from` to `to`, recording why each target before `to` is no good;
    /// does nothing if another request moved the model first.
    fn step_down(&self, from: usize, to: usize, failures: Vec<(usize, String)>) {
        let mut state = self.state();
        if state.active != from {
            return;
        }
        let at = Instant::now();
        for (index, cause) in failures {
            state.failures[index] = Some(Failure { cause, at });
        }
        state.active = to;
        let target = self.targets[to];
        info!(%target, "now running on the fallback engine");
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

    /// An input name every engine fails on.
    const POISON: &str = "poison";

    /// An engine that answers with its name, or fails while `broken` is set or on [`POISON`].
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

        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            if self.broken.load(Ordering::SeqCst) {
                return Err(RuntimeError::Run(format!("{} device lost", self.name)));
            }
            if inputs.iter().any(|t| t.name == POISON) {
                return Err(RuntimeError::Run(format!("{} cannot take it", self.name)));
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
    fn inputs_every_engine_fails_on_are_rejected_and_leave_the_model_in_place() {
        let rig = rig(true).unwrap();
        let poison = Tensor::new(POISON, vec![1], TensorData::Fp32(vec![0.0])).unwrap();
        let err = rig.ladder.run(vec![poison]).unwrap_err();
        assert!(err.is_client_error(), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("ort/cuda: inference failed: cuda cannot take it")
                && message.contains("tract: inference failed: cpu cannot take it"),
            "each engine's reason: {message}"
        );
        assert_eq!(rig.ladder.active(), Target::Ort(Provider::Cuda));
        assert!(rig.ladder.degradation().is_none());
        assert_eq!(answer(&rig.ladder), "cuda");

        // The same failure with the GPU really broken is the GPU's: the fallback answers the
        // next request, and the model steps down then.
        rig.gpu_broken.store(true, Ordering::SeqCst);
        assert_eq!(answer(&rig.ladder), "cpu");
        assert_eq!(rig.ladder.active(), Target::Tract);
    }

    #[test]
    fn a_failure_with_no_fallback_that_loads_keeps_the_model_and_its_error() {
        let loads = Arc::new(AtomicUsize::new(0));
        let counted = loads.clone();
        let broken = Arc::new(AtomicBool::new(true));
        let loader: EngineLoader = Box::new(move |target| match target {
            Target::Tract => {
                counted.fetch_add(1, Ordering::SeqCst);
                Err(RuntimeError::LoadModel {
                    path: "m.onnx".into(),
                    reason: "out of memory".into(),
                })
            }
            Target::Ort(_) => Ok(Arc::new(Scripted {
                name: "cuda",
                broken: broken.clone(),
                runs: Default::default(),
            }) as Arc<dyn Engine>),
        });
        let ladder =
            EngineLadder::load(vec![Target::Ort(Provider::Cuda), Target::Tract], loader).unwrap();
        let err = ladder.run(vec![]).unwrap_err();
        assert!(matches!(err, RuntimeError::Run(_)), "{err}");
        assert!(err.to_string().contains("device lost"), "{err}");
        assert_eq!(loads.load(Ordering::SeqCst), 1, "the fallback was tried");
        assert_eq!(ladder.active(), Target::Ort(Provider::Cuda));
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
