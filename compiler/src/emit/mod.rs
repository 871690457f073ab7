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
}

impl Emit {
    /// The file name this format is written to inside the output directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Emit::Json => "program.json",
            Emit::Text => "program.txt",
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
        }
    }
}

/// Writes `contents` to `path` so that readers see either the old file or
/// the whole new one: write a temporary file beside it, sync, rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
