//! Program -> files: the output formats and the atomic writer every
//! command uses.

pub mod svg;
pub mod torch;

use std::io::Write;
use std::path::Path;
use stp_ir::Program;

/// An output format of `stpc compile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emit {
    /// The IR as JSON (`program.json`).
    Json,
    /// The IR text form (`program.txt`).
    Text,
    /// The IR as compact JSON, format version 2 (`program.compact.json`):
    /// each rank's instructions as one array of integers, about a fifth
    /// of the size; every reader of version 1 in stp reads it too.
    Compact,
}

impl Emit {
    /// The file name this format is written to inside the output directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Emit::Json => "program.json",
            Emit::Text => "program.txt",
            Emit::Compact => "program.compact.json",
        }
    }

    /// The program rendered in this format.
    pub fn render(self, program: &Program) -> String {
        match self {
            Emit::Json => {
                let mut json = stp_ir::to_json(program);
                json.push('\n');
                json
            }
            Emit::Text => stp_ir::print_text(program),
            Emit::Compact => {
                let mut json = stp_ir::to_compact_json(program);
                json.push('\n');
                json
            }
        }
    }
}

/// Writes `contents` to `path` so that readers see either the old file or
/// the whole new one: write a temporary file beside it, sync, rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_all_atomic(&[(path, contents)]).map_err(|(_, e)| e)
}

/// Writes several files so that they land together or not at all: every
/// file goes to a temporary beside its target first, and only when all
/// were written (and no target is a directory, the one way a rename in
/// the same directory fails) are they renamed into place. On failure no
/// target has changed and the error names the path that failed.
pub fn write_all_atomic(files: &[(&Path, &[u8])]) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    let mut temps = Vec::with_capacity(files.len());
    let cleanup = |temps: &[std::path::PathBuf]| {
        for t in temps {
            let _ = std::fs::remove_file(t);
        }
    };
    for (path, contents) in files {
        if path.is_dir() {
            cleanup(&temps);
            let e = std::io::Error::new(std::io::ErrorKind::IsADirectory, "it is a directory");
            return Err((path.to_path_buf(), e));
        }
        match write_temporary(path, contents) {
            Ok(tmp) => temps.push(tmp),
            Err(e) => {
                cleanup(&temps);
                return Err((path.to_path_buf(), e));
            }
        }
    }
    for (i, ((path, _), tmp)) in files.iter().zip(&temps).enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            cleanup(&temps[i..]);
            return Err((path.to_path_buf(), e));
        }
    }
    Ok(())
}

/// `path`'s contents written and synced to a temporary file beside it.
fn write_temporary(path: &Path, contents: &[u8]) -> std::io::Result<std::path::PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
