//! The fused operations composed from burn's ops: the default bodies of
//! [`crate::FusedOps`] and the reference its kernels are tested against. Any backend, any
//! float dtype.

use burn::tensor::activation::{self, sigmoid, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// With `s = σ(g)`: `d_gate = d_out · up · s · (1 + g · (1 − s))`, `d_up = d_out · g · s`.
pub fn swiglu_backward<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>, d_out: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let s = sigmoid(gate.clone());
    let silu = gate.clone() * s.clone();
    let d_gate = d_out.clone() * up * s.clone() * ((gate * (s.neg() + 1.0)) + 1.0);
    (d_gate, d_out * silu)
}

pub fn masked_softmax<B: Backend>(scores: Tensor<B, 4>, bias: Tensor<B, 4>) -> Tensor<B, 4> {
    let heads = scores.dims()[1];
    // repeated per head first: burn-flex adds a broadcast operand through its (slow) strided
    // iterator
    let bias = if bias.dims()[1] == 1 && heads > 1 { bias.repeat_dim(1, heads) } else { bias };
    softmax(scores + bias, 3)
}

pub fn softmax_backward<B: Backend, const D: usize>(probs: Tensor<B, D>, d_probs: Tensor<B, D>) -> Tensor<B, D> {
    let inner = (d_probs.clone() * probs.clone()).sum_dim(D - 1);
    probs * (d_probs - inner)
}

pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation::log_softmax(x, D - 1)
}

pub fn log_softmax_backward<B: Backend, const D: usize>(logp: Tensor<B, D>, d_y: Tensor<B, D>) -> Tensor<B, D> {
    let total = d_y.clone().sum_dim(D - 1);
    d_y - logp.exp() * total
}

/// `rotate_half([x1, x2]) = [−x2, x1]` over the last axis.
pub fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, n, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..t, 0..n, 0..d / 2]);
    let x2 = x.slice([0..b, 0..t, 0..n, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

pub fn rope_heads<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    (x.clone() * cos + rotate_half(x) * sin).swap_dims(1, 2)
}

/// `d_x = d_y · cos + rotate_halfᵀ(d_y · sin)` with `rotate_halfᵀ([z1, z2]) = [z2, −z1]`, after
/// putting `d_y` back to `[batch, len, heads, d]`.
pub fn rope_heads_backward<B: Backend>(d_y: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let d_y = d_y.swap_dims(1, 2);
    d_y.clone() * cos - rotate_half(d_y * sin)
}

pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    // burn's `RmsNorm::forward`, op for op
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + eps).sqrt();
    (x / rms.cast(dtype)) * gamma.unsqueeze()
}

/// In f32 whatever the dtype, the results cast back to it.
pub fn rms_norm_backward<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, eps: f64, d_y: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, 1>) {
    let (dtype, gamma_dtype) = (x.dtype(), gamma.dtype());
    let n = gamma.dims()[0];
    let (x, gamma, d_y) = (x.cast(DType::F32), gamma.cast(DType::F32), d_y.cast(DType::F32));
    let r = (x.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    let x_hat = x * r.clone();
    let g = d_y.clone() * gamma.unsqueeze();
    let mean = (g.clone() * x_hat.clone()).mean_dim(D - 1);
    let d_x = (g - x_hat.clone() * mean) * r;
    let rows = x_hat.dims()[..D - 1].iter().product::<usize>();
    let d_gamma = (d_y * x_hat).reshape([rows, n]).sum_dim(0).reshape([n]);
    (d_x.cast(dtype), d_gamma.cast(gamma_dtype))
}
