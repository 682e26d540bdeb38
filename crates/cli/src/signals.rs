//! Waiting for the signals that ask a process to stop: the proxy's
//! (`trellis_proxy::cli::shutdown`), which every server of the CLI shares.

pub use trellis_proxy::cli::shutdown;
