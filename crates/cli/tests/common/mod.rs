//! Running the real `trellis` binary against a data dir, for the tests
//! that drive a local mesh through the CLI.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// `trellis --data-dir DIR ARGS...`, with its output.
pub fn trellis(dir: &Path, args: &[&str]) -> Output {
    // Global flags first: after `exec ... --` they would belong to CMD.
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("TRELLIS_SERVER")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running trellis")
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// [`trellis`] that must succeed; its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = trellis(dir, args);
    assert!(
        out.status.success(),
        "trellis {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `down` even when an assertion fails, so no test leaves a mesh.
pub struct Down<'a>(pub &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = trellis(self.0, &["down"]);
    }
}
