//! The decoding interface the sampler uses: after a prefill through [`Qwen2::forward`], one new
//! token per sequence and step. [`BurnDecoder`] steps through burn's tensors on any backend;
//! the CPU engine (`t1-cpu`) steps on the host.

use t1_ops::FusedOps;

use crate::model::{Inputs, KvCache, Qwen2};

/// Decoding steps after a prefill.
pub trait Decoder {
    /// The logits `[batch * vocab]`, in f32 on the host, of one new token per sequence
    /// (`inputs.len == 1`, `inputs.past` the positions decoded so far); the tokens' keys and
    /// values are kept for the next step.
    fn step(&mut self, inputs: &Inputs) -> Vec<f32>;

    /// Positions cached so far (prefill included).
    fn len(&self) -> usize;
}

/// Decoding steps through burn: [`Qwen2::forward`] with a [`KvCache`].
pub struct BurnDecoder<'a, B: FusedOps> {
    pub model: &'a Qwen2<B>,
    pub cache: KvCache<B>,
}

impl<B: FusedOps> Decoder for BurnDecoder<'_, B> {
    fn step(&mut self, inputs: &Inputs) -> Vec<f32> {
        let logits = self.model.forward(inputs, Some(&mut self.cache));
        logits.into_data().convert::<f32>().to_vec::<f32>().expect("f32 logits")
    }

    fn len(&self) -> usize {
        self.cache.len()
    }
}
