//! With the `smt` feature, stpc links the system's libz3. Without it the
//! link fails late with a cryptic linker error; say what to do instead.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=Z3_SYS_Z3_HEADER");
    if std::env::var_os("CARGO_FEATURE_SMT").is_none() || std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux")
    {
        return;
    }
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/lib/x86_64-linux-gnu",
    ];
    let extra = std::env::var("LIBRARY_PATH").unwrap_or_default();
    let found = dirs
        .iter()
        .map(std::path::PathBuf::from)
        .chain(extra.split(':').filter(|d| !d.is_empty()).map(std::path::PathBuf::from))
        .any(|dir| dir.join("libz3.so").exists());
    if !found {
        panic!(
            "\n\nstpc's `smt` feature (on by default) links the system Z3 library, and libz3.so was not found.\n\
             Install it (Debian/Ubuntu: `apt-get install libz3-dev`), set LIBRARY_PATH to its directory,\n\
             or build without the Z3 scheduler: `cargo build -p stpc --no-default-features`\n\
             (then `--solver smt` keeps the greedy order and says so).\n"
        );
    }
}
