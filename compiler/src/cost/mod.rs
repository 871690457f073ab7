//! Cost models: where the times the simulator uses come from — unit
//! costs by default, a JSON file, flags, or model and hardware dimensions
//! ([`model`]).

pub mod model;

pub use model::{Hardware, ModelShape, Parallelism};
pub use stp_ir::simulate::CostModel;
