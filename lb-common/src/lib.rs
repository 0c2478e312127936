//! Types and pure functions shared by the kernel programs (`lb-ebpf`) and the
//! agent (`lb-userspace`).
//!
//! Everything that crosses the user/kernel boundary lives here: map keys and
//! values ([`maps`]), capacities, pin names and codes ([`consts`]), and the
//! two pieces of packet arithmetic that both sides must agree on bit for bit:
//! the flow hash ([`hash`]) and incremental Internet checksums ([`csum`]); and
//! the rules of a flow's state ([`flow`]): its keys, and when it is over.
//!
//! Layout rules for map types: `#[repr(C)]`, explicit `_pad` fields so that
//! no byte is implicit, byte order visible in the field name (`_be` = network
//! byte order, as on the wire; addresses are `[u8; N]` in wire order), a
//! compile-time size assertion for each, and no `bool`, `Option` or enum with
//! data inside a map value.
#![no_std]

pub mod consts;
pub mod csum;
pub mod flow;
pub mod hash;
pub mod maps;
pub mod policy;

pub use consts::*;
pub use maps::*;
