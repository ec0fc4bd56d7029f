//! The estate access mesh contract: code generated from `proto/` and the file
//! descriptor set that every server exposes through gRPC reflection.
//!
//! Modules mirror the protobuf package path (`estate.identity.v1` is
//! [`estate::identity::v1`]). Lints are relaxed here alone: the code is generated.
#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

pub use prost;
pub use prost_types;
pub use tonic;

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
