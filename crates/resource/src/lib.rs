//! The Trellis resource model: the typed resources, reading them from YAML
//! or JSON with errors that name the file, document, line and field, and
//! the validation that decides whether an apply is accepted whole.
#![forbid(unsafe_code)]

pub mod types;
pub use types::*;
