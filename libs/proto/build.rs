//! Compiles every .proto under the repository's proto/ directory with a vendored
//! protoc, so that building needs nothing beyond cargo.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../../proto");
    let mut protos = Vec::new();
    collect(&proto_root, &mut protos)?;
    protos.sort();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // An audit event's attributes as an ordered map: encoded in key order, so
    // the same event always has the same bytes, and built without hashing
    // (every card decision builds five).
    config.btree_map([".estate.common.v1.AuditEvent.attributes"]);

    let wkt = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("estate_descriptor.bin"))
        .compile_with_config(config, &protos, &[proto_root.clone(), wkt])?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
