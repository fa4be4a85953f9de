//! The README's main command, `flotilla demo --exit`, run for real: a control plane, agent
//! processes, four releases and four rollouts must go exactly as the script says, and a
//! device joining afterwards must serve the release its peers were given.

use std::process::Command;

use flotilla_tests::{binary, models_dir};

#[test]
fn the_demo_runs_its_script_to_the_expected_outcomes() {
    let flotilla = binary("flotilla");
    let agent = binary("flotilla-agent");
    let output = Command::new(&flotilla)
        .args(["demo", "--exit", "--agents", "4"])
        .arg("--agent-bin")
        .arg(&agent)
        .arg("--models")
        .arg(models_dir())
        .output()
        .expect("flotilla demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for expected in [
        "✓ tiny-bert-embed-1.0.0-1",
        "✓ tiny-bert-embed-2.0.0-1",
        "✓ tiny-bert-embed-2.1.0-1",
        "✓ tiny-bert-embed-3.0.0-1",
        "gate self_test_failures",
        "(over 1 reachable agent)",
        "gate p99_ratio",
        "paired requests)",
        "✓ edge-lyon-new",
        "agents serve (asked on their own APIs): tiny-bert-embed@2.0.0 ×5",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(" 0 failed"),
        "traffic kept flowing through every switch:\n{stdout}"
    );
}
