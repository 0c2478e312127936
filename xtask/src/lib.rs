//! Developer commands for the load balancer workspace: set-up, build, run,
//! demo, the container image, and the dispatch of the tests and the bench.
//!
//! `src/main.rs` is only the command line; each command lives in its own
//! module here. What the tests, the bench and the demo share (the
//! namespace lab, the API-server double, running programs) is the
//! `lb-testkit` crate.

pub mod bench;
pub mod build;
pub mod demo;
pub mod fuzz;
pub mod image;
pub mod run;
pub mod setup;
pub mod test;

pub use lb_testkit::{bpffs_mounted, cmd, is_ci, is_root, lab, target_dir, workspace_root};
