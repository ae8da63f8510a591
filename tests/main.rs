//! Integration tests of t1, compiled as one binary (see crates/t1-cli/Cargo.toml).
//! Everything runs offline on CPU; `--features wgpu` adds the same checks on wgpu.

mod cli;
mod common;
mod crosscheck;
mod eval;
mod hostile;
#[cfg(unix)]
mod kill;
mod lora;
mod model;
mod save_direction;
mod serve;
mod templates;
mod train;
