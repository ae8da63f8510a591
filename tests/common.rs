//! Helpers shared by the integration tests.

use std::path::PathBuf;

use safetensors::SafeTensors;

#[allow(dead_code)]
pub type Flex = t1_backends::FlexBackend;
#[allow(dead_code)]
pub type FlexInner = burn::backend::Flex;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// The Qwen2 checkpoints made by tests/fixtures/make_qwen2.py.
pub const CHECKPOINTS: [&str; 4] = ["qwen2-gqa", "qwen2-tied", "qwen2-sharded", "qwen2-bf16"];

/// `input_ids` `[batch, len]` and `logits` `[batch, len, vocab]` computed by transformers.
pub struct Reference {
    pub batch: usize,
    pub len: usize,
    pub ids: Vec<i64>,
    pub logits: Vec<f32>,
}

pub fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids_view = st.tensor("input_ids").unwrap();
    Reference { batch: ids_view.shape()[0], len: ids_view.shape()[1], ids: i64s(&ids_view), logits: f32s(&st.tensor("logits").unwrap()) }
}

/// The values of a little-endian F32 safetensors tensor.
pub fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The values of a little-endian I64 safetensors tensor.
pub fn i64s(view: &safetensors::tensor::TensorView) -> Vec<i64> {
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    view.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

pub fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(t: burn::tensor::Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Largest |a − b|; +∞ when either side has a NaN or an infinity, so every bound fails on them.
#[allow(unused_imports)]
pub use t1_model::compare::{max_abs, max_abs_diff, max_rel_diff, same_bits};
