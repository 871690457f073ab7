//! Names and types: resolves every name, checks every type, arity and
//! schedule shape, and returns a [`Module`] that elaboration can evaluate
//! without further checks.

mod resolve;

use crate::diag::Diagnostic;
use crate::syntax::ast::{File, Function, Item, Schedule, Symbol};

pub use resolve::{BUILTINS, COST_FIELDS, MEMORY_FIELDS, OPS};

/// A file whose names and types are known to be right.
#[derive(Debug, Clone)]
pub struct Module {
    file: File,
    /// By symbol: the item index of the function with that name.
    functions: Vec<Option<usize>>,
}

impl Module {
    /// The schedules in source order.
    pub fn schedules(&self) -> impl Iterator<Item = &Schedule> {
        self.file.items.iter().filter_map(|i| match i {
            Item::Schedule(s) => Some(s),
            Item::Function(_) => None,
        })
    }

    /// The function named by `name`'s symbol.
    pub fn function(&self, name: Symbol) -> Option<&Function> {
        match self.functions.get(name.0 as usize).copied().flatten().map(|i| &self.file.items[i]) {
            Some(Item::Function(f)) => Some(f),
            _ => None,
        }
    }
}

/// Checks names, types, arity and schedule shape of a parsed file.
pub fn analyze(file: File) -> Result<Module, Vec<Diagnostic>> {
    let errors = resolve::check_file(&file);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut functions = Vec::new();
    for (i, item) in file.items.iter().enumerate() {
        if let Item::Function(f) = item {
            let sym = f.name.sym.0 as usize;
            if functions.len() <= sym {
                functions.resize(sym + 1, None);
            }
            functions[sym] = Some(i);
        }
    }
    Ok(Module { file, functions })
}
