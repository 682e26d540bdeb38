//! The Trellis resource model: the typed resources, reading them from YAML
//! or JSON with errors that name the file, document, line and field, and
//! the validation that decides whether an apply is accepted whole, and the
//! model logic every crate shares: what routes reference, durations.
#![forbid(unsafe_code)]

pub mod duration;
pub mod limits;
pub mod load;
mod nesting;
pub mod refs;
#[cfg(feature = "schema")]
pub mod schema;
pub mod traffic;
pub mod types;
pub mod validate;
mod wire;

pub use duration::{
    format_duration, parse_duration, parse_duration_loose, parse_optional_duration, DurationError,
};
pub use limits::{clip, clip_message};
pub use load::{
    load_path, load_path_with_sources, parse_documents, parse_documents_with_sources, to_yaml,
    LoadError, ResourceError, Source,
};
pub use refs::{names_service, ObjectRef, RefPlace, RouteRef, ServiceRefKey};
pub use traffic::*;
pub use types::*;
pub use validate::{validate_apply, validate_delete};
pub use wire::ResourceSeed;
