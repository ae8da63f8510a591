//! The CPU decoding engine. After a prefill through burn, [`HostEngine::decoder`] runs each
//! one-token-per-sequence step on plain `f32` slices: the weights copied to the host once per
//! `generate` call and packed for a few-row AVX-512 kernel (`packed.rs`), keys and values in
//! host buffers that grow by doubling (`decode.rs`), and the work of a step split between a few
//! spinning threads (`team.rs`). It implements [`t1_model::Decoder`], the interface the sampler
//! in `t1-train` uses; on other backends and CPUs the sampler decodes through burn
//! ([`t1_model::BurnDecoder`]).

mod decode;
mod packed;
mod team;

pub use decode::{HostDecoder, HostEngine};
