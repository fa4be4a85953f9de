//! Choosing where a model runs: from the agent's preferences, what the bundle allows, whether
//! ONNX Runtime is present and whether the host has a GPU, the ordered list of targets to try.

use std::sync::Once;

use flotilla_shared::manifest::Backend;
use tracing::{info, warn};

use super::{OrtRuntime, OrtSettings, Provider, Target};

/// Which GPU providers ONNX Runtime is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GpuProviders {
    /// On a host with a GPU, TensorRT then CUDA, each only if the library has it.
    #[default]
    Auto,
    /// Exactly these, in order, whatever the host or library; one that fails is a degradation.
    Listed(Vec<Provider>),
}

/// What the agent may run models on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Backends in order of preference.
    pub backends: Vec<Backend>,
    /// GPU providers to try before ONNX Runtime's CPU provider.
    pub gpu_providers: GpuProviders,
    /// How ONNX Runtime is found and started.
    pub ort: OrtSettings,
    /// Whether the host has a GPU (see [`crate::host::has_gpu`]).
    pub host_gpu: bool,
}

impl Placement {
    /// Preferences `backends`, automatic GPU providers, ONNX Runtime from `ORT_DYLIB_PATH`.
    pub fn new(backends: Vec<Backend>) -> Self {
        Self {
            backends,
            gpu_providers: GpuProviders::Auto,
            ort: OrtSettings::default(),
            host_gpu: crate::host::has_gpu(),
        }
    }

    /// ONNX Runtime, started now if it is not yet; `None` when it does not start.
    fn start_ort(&self) -> Option<&'static OrtRuntime> {
        let runtime = OrtRuntime::init(&self.ort).ok()?;
        LOADED.call_once(|| {
            info!(library = %runtime.library().display(), "onnxruntime loaded");
        });
        Some(runtime)
    }

    /// Whether ONNX Runtime can serve here without loading it: it is loaded already, or its
    /// library is where the settings say. The library costs about 20 MB of resident memory,
    /// so it is loaded only when a model needs it; a library that is present but broken shows
    /// up then, as a load failure that falls back like any other.
    fn ort_present(&self) -> bool {
        if !self.backends.contains(&Backend::Ort) {
            return false;
        }
        if OrtRuntime::get().is_some() {
            return true;
        }
        match super::onnxruntime::locate_library(&self.ort) {
            Ok(_) => true,
            Err(reason) => {
                say_unavailable(&reason);
                false
            }
        }
    }

    /// The preferred backends this host can run, in order; ONNX Runtime as
    /// `Placement::ort_present` sees it.
    pub fn available_backends(&self) -> Vec<Backend> {
        self.backends
            .iter()
            .copied()
            .filter(|b| match b {
                Backend::Tract => true,
                Backend::Ort => self.ort_present(),
            })
            .collect()
    }

    /// Targets to try for a bundle that allows `allowed`, best first. ONNX Runtime's are in
    /// whenever its library is present, even if it does not start: their loads then fail with
    /// the reason, and the model runs on tract, degraded, until a retry starts it.
    pub fn targets(&self, allowed: &[Backend]) -> Vec<Target> {
        let ort_present = self.ort_present();
        let ort = if ort_present { self.start_ort() } else { None };
        let gpu: Vec<Provider> = match (&self.gpu_providers, ort) {
            (GpuProviders::Listed(list), _) => list.clone(),
            (GpuProviders::Auto, Some(runtime)) if self.host_gpu => {
                [Provider::TensorRt, Provider::Cuda]
                    .into_iter()
                    .filter(|p| runtime.has_provider(*p))
                    .collect()
            }
            (GpuProviders::Auto, _) => Vec::new(),
        };
        let available: Vec<Backend> = self
            .backends
            .iter()
            .copied()
            .filter(|b| *b == Backend::Tract || ort_present)
            .collect();
        plan(&available, allowed, &gpu)
    }
}

/// Said once per process, however many times it is found.
static LOADED: Once = Once::new();
static UNAVAILABLE: Once = Once::new();

fn say_unavailable(reason: &str) {
    UNAVAILABLE.call_once(|| {
        warn!(error = %reason, "onnxruntime is not available; models run on tract");
    });
}

/// Orders targets: each preferred backend the bundle allows, ONNX Runtime with the GPU
/// providers first and its CPU provider last.
pub fn plan(available: &[Backend], allowed: &[Backend], gpu: &[Provider]) -> Vec<Target> {
    let mut targets = Vec::new();
    for backend in available.iter().filter(|b| allowed.contains(b)) {
        match backend {
            Backend::Tract => targets.push(Target::Tract),
            Backend::Ort => {
                let gpu = gpu.iter().filter(|p| p.is_gpu()).map(|p| Target::Ort(*p));
                targets.extend(gpu);
                targets.push(Target::Ort(Provider::Cpu));
            }
        }
    }
    targets.dedup();
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Backend; 2] = [Backend::Ort, Backend::Tract];

    #[test]
    fn gpu_first_then_cpu_onnxruntime_then_tract() {
        let targets = plan(&BOTH, &BOTH, &[Provider::TensorRt, Provider::Cuda]);
        assert_eq!(
            targets,
            [
                Target::Ort(Provider::TensorRt),
                Target::Ort(Provider::Cuda),
                Target::Ort(Provider::Cpu),
                Target::Tract
            ]
        );
        assert_eq!(
            plan(&BOTH, &BOTH, &[]),
            [Target::Ort(Provider::Cpu), Target::Tract]
        );
    }

    #[test]
    fn the_bundle_and_the_host_both_restrict_the_choice() {
        assert_eq!(
            plan(&BOTH, &[Backend::Tract], &[Provider::Cuda]),
            [Target::Tract],
            "a tract-only bundle never goes to onnxruntime"
        );
        assert_eq!(
            plan(&[Backend::Tract], &BOTH, &[Provider::Cuda]),
            [Target::Tract],
            "no onnxruntime library: tract"
        );
        assert_eq!(
            plan(&[Backend::Tract, Backend::Ort], &BOTH, &[]),
            [Target::Tract, Target::Ort(Provider::Cpu)],
            "the agent's preference order holds"
        );
        assert!(plan(&[Backend::Tract], &[Backend::Ort], &[]).is_empty());
    }
}
