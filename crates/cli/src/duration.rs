//! Durations typed on the command line (`500ms`, `30s`, `1h30m`): the loose
//! form of trellis-resource's one duration parser (`trellis_proxy::cli`
//! holds the clap side, which the proxy-only binary shares).

pub use trellis_proxy::cli::parse_duration;
pub use trellis_resource::format_duration;
