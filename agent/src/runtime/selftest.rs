//! Self-tests: run a bundle's known inputs and compare against its expected outputs.

use flotilla_shared::manifest::{SelfTest, SelfTestInput};
use flotilla_shared::tensor::Tensor;

use super::{Model, RuntimeError};

/// Outcome of one self-test.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTestOutcome {
    /// Self-test name.
    pub name: String,
    /// Largest element difference over all expected outputs (infinite when incomparable).
    pub max_abs_diff: f64,
    /// Allowed difference.
    pub tolerance: f64,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

impl SelfTestOutcome {
    /// Whether the model produced the expected outputs within tolerance.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Runs a self-test's input through the model and returns what came out: the graph outputs for
/// tensor inputs, the task's answer tensor for texts.
pub fn compute(model: &Model, input: &SelfTestInput) -> Result<Vec<Tensor>, RuntimeError> {
    match input {
        SelfTestInput::Tensors(tensors) => model.infer(tensors.clone()),
        SelfTestInput::Texts(texts) => Ok(vec![model.run_texts(texts)?]),
    }
}

/// Runs one self-test and compares every expected tensor.
pub fn run(model: &Model, test: &SelfTest) -> SelfTestOutcome {
    let outcome = |max_abs_diff, failure| SelfTestOutcome {
        name: test.name.clone(),
        max_abs_diff,
        tolerance: test.tolerance,
        failure,
    };
    let actual = match compute(model, &test.input) {
        Ok(outputs) => outputs,
        Err(e) => return outcome(f64::INFINITY, Some(e.to_string())),
    };

    let mut worst = 0.0f64;
    for expected in &test.expected {
        let Some(got) = actual.iter().find(|t| t.name == expected.name) else {
            return outcome(
                f64::INFINITY,
                Some(format!("output {:?} not produced", expected.name)),
            );
        };
        match got.max_abs_diff(expected) {
            Ok(diff) => worst = worst.max(diff),
            Err(e) => return outcome(f64::INFINITY, Some(e.to_string())),
        }
    }
    let failure = (worst > test.tolerance).then(|| {
        format!(
            "max difference {worst:.3e} exceeds tolerance {:.1e}",
            test.tolerance
        )
    });
    outcome(worst, failure)
}

/// Runs every self-test; the model passes when all do.
pub fn run_all(model: &Model, tests: &[SelfTest]) -> Vec<SelfTestOutcome> {
    tests.iter().map(|t| run(model, t)).collect()
}
