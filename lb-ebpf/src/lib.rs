// A library target so that `lb-userspace` can build-depend on this crate
// (cargo then rebuilds the agent when the datapath changes). The programs
// themselves are the `lb` binary (src/main.rs).
#![no_std]
