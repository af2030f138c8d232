//! Generated protobuf types and tonic services.
//!
//! `mesh` is the service-to-service API (versioned `switchboard.mesh.v1`);
//! `api` is the public server-side API (`switchboard.api.v1`).

#![allow(clippy::all, missing_docs)]

pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("switchboard.mesh.v1");
    }
    pub use v1::*;
}

pub mod api {
    pub mod v1 {
        tonic::include_proto!("switchboard.api.v1");

        /// The encoded descriptors of this package, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("switchboard_api_v1");
    }
    pub use v1::*;
}
