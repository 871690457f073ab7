//! Names and types: resolves every name, checks every type, arity and
//! schedule shape, and returns a [`Module`] that elaboration can evaluate
//! without further checks.

mod resolve;

use crate::diag::Diagnostic;
use crate::syntax::ast::{File, Function, Item, Schedule};
use std::collections::HashMap;

pub use resolve::{BUILTINS, OPS};

/// A file whose names and types are known to be right.
#[derive(Debug, Clone)]
pub struct Module {
    file: File,
    functions: HashMap<String, usize>,
}

impl Module {
    /// The schedules in source order.
    pub fn schedules(&self) -> impl Iterator<Item = &Schedule> {
        self.file.items.iter().filter_map(|i| match i {
            Item::Schedule(s) => Some(s),
            Item::Function(_) => None,
        })
    }

    /// The function named `name`.
    pub fn function(&self, name: &str) -> Option<&Function> {
        match self.functions.get(name).map(|&i| &self.file.items[i]) {
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
    let functions = file
        .items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| match item {
            Item::Function(f) => Some((f.name.name.clone(), i)),
            Item::Schedule(_) => None,
        })
        .collect();
    Ok(Module { file, functions })
}
