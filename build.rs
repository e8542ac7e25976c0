//! Compiles proto/ with protox (pure Rust), so no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "tokenbroker/v1/lease.proto",
        "tokenbroker/v1/credential.proto",
        "tokenbroker/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds migrations/ but cannot tell cargo to watch it.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC reflection.
    std::fs::write(
        out_dir.join("tokenbroker_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The lease, a credential version and a token lookup carry the
        // PAT: their Debug is written by hand, redacted.
        .skip_debug([
            "tokenbroker.v1.Lease",
            "tokenbroker.v1.CredentialVersion",
            "tokenbroker.v1.LookupTokenRequest",
        ])
        // tonic_prost's codec, but an undecodable request is
        // INVALID_ARGUMENT, not INTERNAL (src/api/codec.rs).
        .codec_path("crate::api::codec::ApiCodec")
        .compile_fds(fds)?;
    Ok(())
}
