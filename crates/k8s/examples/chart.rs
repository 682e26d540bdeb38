//! Writes the Helm chart (charts/trellis) from the install template:
//! `cargo run -p trellis-k8s --example chart`. A test fails while the
//! chart in the repository differs from what this writes.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/trellis");
    if dir.join("crds").exists() {
        // CRDs no longer generated must not linger.
        std::fs::remove_dir_all(dir.join("crds"))?;
    }
    for (path, contents) in trellis_k8s::install::chart_files() {
        let file = dir.join(&path);
        std::fs::create_dir_all(file.parent().expect("a file has a folder"))?;
        std::fs::write(&file, contents)?;
        println!("wrote charts/trellis/{path}");
    }
    Ok(())
}
