//! The estate access mesh contract: code generated from `proto/` and the file
//! descriptor set that every server exposes through gRPC reflection.
//!
//! Modules mirror the protobuf package path (`estate.identity.v1` is
//! [`estate::identity::v1`]). Lints are relaxed here alone: the code is generated.
#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

pub use prost;
pub use prost_types;
pub use tonic;

/// Metadata key carrying the bare token, the alternative to
/// `authorization: Bearer <token>` that gate controllers use
/// (`libs/gate-sdk`). HTTP/2 header compression never indexes
/// `authorization` (h2 follows nghttp2 there), so a controller calling many
/// times a second on one connection sent its ~450-byte token with every
/// call and both ends Huffman-coded it each time; under this name the token
/// is indexed once per connection and later calls send a one-byte
/// reference (BENCHMARKS.md, session 22). Indexing is safe for these
/// tokens: HPACK only ever matches a whole value, and a signed token cannot
/// be guessed whole.
pub const TOKEN_HEADER: &str = "estate-token";

/// Encoded `FileDescriptorSet` of every proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/estate_descriptor.bin"));

/// Generated packages, one module per protobuf package segment.
pub mod estate {
    pub mod common {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.common.v1.rs"));
        }
    }
    pub mod identity {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.identity.v1.rs"));
        }
    }
    pub mod audit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.audit.v1.rs"));
        }
    }
    pub mod consent {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.consent.v1.rs"));
        }
    }
    pub mod credentials {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.credentials.v1.rs"));
        }
    }
    pub mod gate {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.gate.v1.rs"));
        }
    }
    pub mod facematch {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/estate.facematch.v1.rs"));
        }
    }
}

pub use estate::audit::v1 as audit;
pub use estate::common::v1 as common;
pub use estate::consent::v1 as consent;
pub use estate::credentials::v1 as credentials;
pub use estate::facematch::v1 as facematch;
pub use estate::gate::v1 as gate;
pub use estate::identity::v1 as identity;

/// One RPC of the mesh's own services, as the descriptor set lists it.
#[derive(Debug, Clone)]
pub struct RpcInfo {
    /// `/estate.gate.v1.GateService/Decide`
    pub path: String,
    /// `gate` (the package name between `estate.` and `.v1`).
    pub service: String,
    /// `Decide`
    pub method: String,
    /// The request message's full name, `.estate.gate.v1.DecideRequest`.
    pub input_type: String,
    /// Whether the client or the server streams.
    pub streaming: bool,
}

/// Every RPC of the `estate.*` packages in [`FILE_DESCRIPTOR_SET`].
pub fn rpcs() -> Vec<RpcInfo> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        let Some(service) = package.strip_prefix("estate.").and_then(|p| p.strip_suffix(".v1")) else {
            continue;
        };
        for s in file.service {
            let class = s.name.unwrap_or_default();
            for m in s.method {
                let method = m.name.unwrap_or_default();
                out.push(RpcInfo {
                    path: format!("/{package}.{class}/{method}"),
                    service: service.to_owned(),
                    method,
                    input_type: m.input_type.unwrap_or_default(),
                    streaming: m.server_streaming.unwrap_or(false) || m.client_streaming.unwrap_or(false),
                });
            }
        }
    }
    out
}
