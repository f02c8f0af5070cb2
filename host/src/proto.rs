//! The protobuf messages of `proto/`, generated at build time.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/sluice.v1.rs"));

/// The encoded `FileDescriptorSet` of `proto/`, as Druid's protobuf input format needs it.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
