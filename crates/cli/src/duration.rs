//! Durations typed on the command line (`500ms`, `30s`, `1h30m`): the loose
//! form of trellis-resource's one duration parser.

use std::time::Duration;

pub use trellis_resource::format_duration;

/// `trellis_resource::parse_duration_loose`, its error as the text that clap
/// and `Latency::parse` show.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    Ok(trellis_resource::parse_duration_loose(s)?)
}
