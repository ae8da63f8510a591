//! The model's fused operations as a burn backend extension: [`FusedOps`].
//!
//! burn 0.21 composes SwiGLU, the attention's masked softmax, rotate-half RoPE, RMSNorm and
//! log-softmax from element-wise ops on every backend, and its autodiff records each of them
//! (SwiGLU was six passes over the MLP's activations forward and ten backward). `FusedOps` makes
//! each one operation, forward and backward, that a backend may implement with its own kernel:
//! this is burn's pattern for custom kernels (a trait over `Backend`, implemented for each
//! backend and for `Autodiff<B>`), so the model calls `B::rms_norm(...)` with no run-time type
//! checks. Every method has a default body that composes burn's ops (`compose`), the reference
//! the kernels are tested against.
//!
//! Implemented for
//! - `Flex` (`flex.rs`): one pass each way on f32 host slices (`kernels`); other dtypes
//!   compose;
//! - `Autodiff<B>` for any `B: FusedOps` (`autodiff.rs`): each op is one node of the graph whose
//!   backward is `B`'s `*_backward` method;
//! - burn's CubeCL backends, wgpu and CUDA (`cube.rs`, feature `cubecl`): RMSNorm forward and
//!   backward as CubeCL kernels written once for both; the rest composes.
//!
//! **Architecture invariant:** the crates under `backends/` are the only ones that name a
//! concrete backend. Everything else is generic over [`FusedOps`] / [`FusedAutodiff`].

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

mod autodiff;
pub mod compose;
#[cfg(feature = "cubecl")]
mod cube;
mod flex;
pub mod kernels;

/// A burn backend with the model's fused operations. Shapes are those the model uses; the
/// defaults compose burn's ops and accept any float dtype.
pub trait FusedOps: Backend {
    /// Whether the backend's tensors live in host memory, where a CPU engine can read them
    /// directly (the CPU decoding engine of `t1-cpu` runs only there).
    const HOST_MEMORY: bool = false;

    /// `silu(gate) * up`, element-wise; `gate` and `up` of one shape.
    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        compose::swiglu(gate, up)
    }

    /// Gradients of [`FusedOps::swiglu`] with respect to `gate` and `up`, given the output's.
    fn swiglu_backward<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>, d_out: Tensor<Self, D>) -> (Tensor<Self, D>, Tensor<Self, D>) {
        compose::swiglu_backward(gate, up, d_out)
    }

    /// `softmax(scores + bias)` over the last axis, with `scores` `[batch, heads, len, keys]`
    /// and `bias` `[batch, 1, len, keys]` shared by the heads (the attention mask; a bias per
    /// head, `[batch, heads, len, keys]`, is also accepted).
    fn masked_softmax(scores: Tensor<Self, 4>, bias: Tensor<Self, 4>) -> Tensor<Self, 4> {
        compose::masked_softmax(scores, bias)
    }

    /// Gradient of a softmax over the last axis with output `probs`: `p · (d_p − Σ d_p · p)`.
    fn softmax_backward<const D: usize>(probs: Tensor<Self, D>, d_probs: Tensor<Self, D>) -> Tensor<Self, D> {
        compose::softmax_backward(probs, d_probs)
    }

    /// Log-softmax over the last axis (burn names its own op `log_softmax`), the token log-probabilities of every loss.
    fn log_softmax_last<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        compose::log_softmax(x)
    }

    /// Gradient of [`FusedOps::log_softmax_last`] with output `logp`: `d_y − exp(logp) · Σ d_y`.
    fn log_softmax_last_backward<const D: usize>(logp: Tensor<Self, D>, d_y: Tensor<Self, D>) -> Tensor<Self, D> {
        compose::log_softmax_backward(logp, d_y)
    }

    /// Rotate-half RoPE (HF layout) of `x` `[batch, len, heads, d]` with tables `cos`, `sin` of
    /// the same shape, returned heads first, `[batch, heads, len, d]`:
    /// `x · cos + rotate_half(x) · sin` with `rotate_half([x1, x2]) = [−x2, x1]`.
    fn rope_heads(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        compose::rope_heads(x, cos, sin)
    }

    /// Gradient of [`FusedOps::rope_heads`] with respect to `x`: `d_y` `[batch, heads, len, d]`
    /// → `[batch, len, heads, d]`, the transposed rotation.
    fn rope_heads_backward(d_y: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        compose::rope_heads_backward(d_y, cos, sin)
    }

    /// RMSNorm over the last axis, as burn's `RmsNorm`: `x / sqrt(mean(x²) + eps) · gamma`
    /// (the mean of squares in f32), `gamma` `[last axis]`.
    fn rms_norm<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, D> {
        compose::rms_norm(x, gamma, eps)
    }

    /// Gradients of [`FusedOps::rms_norm`] with respect to `x` and `gamma`: with
    /// `r = 1 / sqrt(mean(x²) + eps)`, `x̂ = x · r`, `g = d_y · gamma`,
    /// `d_x = r · (g − x̂ · mean(g · x̂))` and `d_gamma = Σ_rows d_y · x̂`.
    fn rms_norm_backward<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64, d_y: Tensor<Self, D>) -> (Tensor<Self, D>, Tensor<Self, 1>) {
        compose::rms_norm_backward(x, gamma, eps, d_y)
    }
}

/// A training backend whose forward and backward both have the fused operations:
/// `Autodiff<B>` for a `B: FusedOps`.
pub trait FusedAutodiff: FusedOps + AutodiffBackend<InnerBackend: FusedOps> {}

impl<B: FusedOps + AutodiffBackend<InnerBackend: FusedOps>> FusedAutodiff for B {}
