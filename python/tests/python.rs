//! Runs the `stp` Python package's own tests (python/tests/test_*.py,
//! standard-library `unittest`) against the native module this build
//! just made, so that `cargo test --workspace` — the README's one test
//! command — covers the Python package too.
//!
//! The package is assembled in a scratch directory as an installed one
//! would be laid out (`stp/*.py` beside `stp/_stp.abi3.so`, the cdylib
//! cargo built for this crate), and imported from there with the
//! interpreter in `STP_PYTHON`, else the cached PyTorch environment
//! `scripts/python-env.sh` makes (`~/.cache/stp/venv`) if it exists, else
//! `python3` (CPython 3.9 or later). Without PyTorch the torch tests are
//! skipped, unless `STP_REQUIRE_TORCH=1` (as `scripts/test` sets).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory cargo put this test's dependencies in (`target/debug`).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/debug/deps/python-<hash> -> target/debug
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// The native module cargo built from src/lib.rs for this test run: a
/// library built as a test's dependency stays in `deps/` (only `cargo
/// build` copies it up a level, so a copy there may be stale).
fn native_module() -> PathBuf {
    let name = if cfg!(target_os = "macos") { "lib_stp.dylib" } else { "lib_stp.so" };
    let candidates = [build_dir().join("deps").join(name), build_dir().join(name)];
    let found = candidates.iter().find(|p| p.exists());
    found
        .cloned()
        .unwrap_or_else(|| panic!("{name} is missing from {}: build the stp-python crate", build_dir().display()))
}

/// `stp/` laid out as an installed package, in a fresh scratch directory.
fn assemble_package() -> PathBuf {
    let root = build_dir().join("python-package");
    let package = root.join("stp");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&package).expect("a scratch directory");
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("stp");
    for entry in std::fs::read_dir(&sources).expect("python/stp") {
        let path = entry.expect("a directory entry").path();
        if path.is_file() {
            std::fs::copy(&path, package.join(path.file_name().expect("a file name"))).expect("copy a module");
        }
    }
    std::fs::copy(native_module(), package.join("_stp.abi3.so")).expect("copy the native module");
    root
}

/// The interpreter to test with (see the module's comment).
fn interpreter() -> String {
    if let Ok(python) = std::env::var("STP_PYTHON") {
        return python;
    }
    let cached = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/stp/venv/bin/python"));
    match cached {
        Some(path) if path.exists() => path.display().to_string(),
        _ => "python3".into(),
    }
}

#[test]
fn the_python_package_passes_its_tests() {
    let package = assemble_package();
    let python = interpreter();
    eprintln!("testing the Python package with {python}");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let output = Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        .arg("-t")
        .arg(&tests)
        // From the package's directory: `python -m` puts the working
        // directory first on the path, and python/ holds the sources of
        // `stp` without the native module.
        .current_dir(&package)
        .env("PYTHONPATH", &package)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (set STP_PYTHON to a CPython 3.9+ interpreter): {e}"));
    let report = String::from_utf8_lossy(&output.stderr);
    eprintln!("{report}");
    assert!(output.status.success(), "the Python tests failed:\n{report}");
    assert!(report.contains("\nOK"), "unittest ran nothing:\n{report}");
}
