//! Finds the ONNX Runtime shared library for tests: `ORT_DYLIB_PATH`, else the `onnxruntime`
//! Python package's copy. Without it a test fails with the reason, unless `FLOTILLA_SKIP_ORT=1`
//! says to skip (CI never sets it).

#![allow(dead_code)] // Each test binary uses a different part of this helper.

use std::path::PathBuf;
use std::process::Command;

use flotilla_agent::runtime::{OrtRuntime, OrtSettings};

/// Where the onnxruntime wheel keeps its library, relative to the package directory.
const WHEEL_LIBRARY: &str = "capi/libonnxruntime.so.1.31.1";

/// The library path, or why there is none.
pub fn library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .map_err(|e| format!("cannot run python3 to find onnxruntime: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "python3 cannot import onnxruntime: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let package = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let library = package.join(WHEEL_LIBRARY);
    if !library.is_file() {
        return Err(format!("{} does not exist", library.display()));
    }
    Ok(library)
}

/// Starts ONNX Runtime for this test process, or returns `None` when `FLOTILLA_SKIP_ORT=1`
/// and the library cannot be found. Panics with the reason otherwise.
pub fn runtime() -> Option<&'static OrtRuntime> {
    let library = match library() {
        Ok(library) => library,
        Err(reason) if std::env::var("FLOTILLA_SKIP_ORT").as_deref() == Ok("1") => {
            eprintln!("skipping: onnxruntime not found ({reason}) and FLOTILLA_SKIP_ORT=1");
            return None;
        }
        Err(reason) => panic!(
            "the onnxruntime library is needed: {reason}. Install it with \
             `pip install onnxruntime==1.31.1` or set ORT_DYLIB_PATH \
             (FLOTILLA_SKIP_ORT=1 skips these tests)"
        ),
    };
    let settings = OrtSettings {
        library: Some(library),
        intra_op_threads: 2,
    };
    Some(OrtRuntime::init(&settings).unwrap_or_else(|e| panic!("{e}")))
}
