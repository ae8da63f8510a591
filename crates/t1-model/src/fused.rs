//! Fused operations on burn-flex: SwiGLU, the attention's masked softmax, RoPE, RMSNorm and
//! log-softmax.
//!
//! burn 0.21 composes `silu(gate) * up`, `softmax(scores + bias)`, rotate-half RoPE, RMSNorm
//! and `log_softmax` from element-wise ops on every backend, and its autodiff records each of
//! them: SwiGLU was six
//! passes over the MLP's `[tokens, intermediate]` activations forward and ten backward (the
//! sigmoid is computed twice), with libm's `expf` one value at a time (and its slow underflow
//! path on the −1e9 attention mask). Here each is one pass forward and one backward on the
//! host ([`crate::kernels`]), with a hand-written backward registered with burn-autodiff. The
//! kernels run on the calling thread: on the CPU, training gets its parallelism from the
//! data-parallel shards (`train.threads`), one thread each. NaN inputs give NaN outputs, so a
//! diverged loss is still caught by the trainer.
//!
//! The model stays generic: these functions check the backend's tensor type at run time
//! (`Any`) and take the fused path only for f32 tensors of burn-flex, with or without burn's
//! default autodiff; every other backend, dtype or shape goes through burn's composition, the
//! same math (the tests compare the two, values and gradients). This is the one place outside
//! `t1-backends` that names a concrete backend.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::RmsNorm;
use burn::tensor::activation::{self, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use crate::kernels;

/// Tensors of burn's default CPU training backend, `Autodiff<Flex>`.
type AdTensor = FloatTensor<Autodiff<Flex>>;

/// `silu(gate) * up`, element-wise; `gate` and `up` of one shape.
pub(crate) fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.dims() != up.dims() {
        return silu(gate) * up;
    }
    let inputs = [gate.into_primitive().tensor(), up.into_primitive().tensor()];
    match on_flex::<B, 2>(inputs, |[g, u]| Ok(swiglu_autodiff(g, u)), |[g, u]| swiglu_flex(&g, &u)) {
        Ok(y) => tensor(y),
        Err([g, u]) => silu(tensor::<B, D>(g)) * tensor(u),
    }
}

/// `softmax(scores + bias)` over the last axis, with `scores` `[batch, heads, len, keys]` and a
/// constant `bias` `[batch, 1, len, keys]` shared by the heads (the attention mask). A bias
/// that requires a gradient goes through burn's ops and gets it.
pub(crate) fn masked_softmax<B: Backend>(scores: Tensor<B, 4>, bias: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, s] = scores.dims();
    // burn's ops; the bias is repeated per head first, as burn-flex adds a broadcast operand
    // through its (slow) strided iterator
    let composed = |x: Tensor<B, 4>, bias: Tensor<B, 4>| {
        let bias = if bias.dims()[1] == 1 && h > 1 { bias.repeat_dim(1, h) } else { bias };
        softmax(x + bias, 3)
    };
    if scores.dtype() != DType::F32 || bias.dtype() != DType::F32 || bias.dims() != [b, 1, t, s] {
        return composed(scores, bias);
    }
    let inputs = [scores.into_primitive().tensor(), bias.into_primitive().tensor()];
    let ad = |[x, bias]: [AdTensor; 2]| if bias.is_tracked() { Err([x, bias]) } else { Ok(softmax_autodiff(x, &bias.primitive)) };
    match on_flex::<B, 2>(inputs, ad, |[x, bias]| softmax_flex(&x, &bias)) {
        Ok(y) => tensor(y),
        Err([x, bias]) => composed(tensor(x), tensor(bias)),
    }
}

/// Rotate-half RoPE of `x` `[batch, len, heads, d]` with constant tables `(cos, sin)` of the
/// same shape, returned as `[batch, heads, len, d]`: on burn-flex one pass that also puts the
/// heads first (contiguous, so attention needs no strided copy), else burn's ops and
/// `swap_dims`.
pub(crate) fn rope_heads<B: Backend>(x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
    let f32s = [x.dtype(), cos.dtype(), sin.dtype()].iter().all(|d| *d == DType::F32);
    if !f32s || cos.dims() != x.dims() || sin.dims() != x.dims() {
        return rotate(x, cos.clone(), sin.clone()).swap_dims(1, 2);
    }
    let inputs = [x, cos.clone(), sin.clone()].map(|t| t.into_primitive().tensor());
    let ad = |[x, c, s]: [AdTensor; 3]| if c.is_tracked() || s.is_tracked() { Err([x, c, s]) } else { Ok(rope_autodiff(x, c.primitive, s.primitive)) };
    match on_flex::<B, 3>(inputs, ad, |[x, c, s]| rope_flex(&x, &c, &s)) {
        Ok(y) => tensor(y),
        Err([x, c, s]) => rotate(tensor(x), tensor(c), tensor(s)).swap_dims(1, 2),
    }
}

/// Rotate-half RoPE (HF layout) through burn's ops: `x * cos + rotate_half(x) * sin`, `x` and
/// the tables `[batch, len, heads, d]`.
fn rotate<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, n, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..t, 0..n, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..t, 0..n, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// `norm.forward(x)`: RMSNorm over the last axis with the norm's `gamma` and epsilon; one pass
/// each way on burn-flex in f32 (the backward also gives `gamma`'s gradient).
pub(crate) fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let gamma = norm.gamma.val();
    if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || gamma.dims()[0] != x.dims()[D - 1] {
        return norm.forward(x);
    }
    let eps = norm.epsilon as f32;
    let inputs = [x.into_primitive().tensor(), gamma.into_primitive().tensor()];
    match on_flex::<B, 2>(inputs, |[x, g]| Ok(rms_norm_autodiff(x, g, eps)), |[x, g]| rms_norm_flex(&x, &g, eps)) {
        Ok(y) => tensor(y),
        Err([x, _]) => norm.forward(tensor(x)),
    }
}

/// Log-softmax over the last axis, as `burn::tensor::activation::log_softmax(x, D - 1)`; one
/// pass each way on burn-flex in f32 (the token log-probabilities of every loss).
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() != DType::F32 {
        return activation::log_softmax(x, D - 1);
    }
    match on_flex::<B, 1>([x.into_primitive().tensor()], |[x]| Ok(log_softmax_autodiff(x)), |[x]| log_softmax_flex(&x)) {
        Ok(y) => tensor(y),
        Err([x]) => activation::log_softmax(tensor::<B, D>(x), D - 1),
    }
}

/// `ad(xs)` where the primitives are burn-flex tensors with burn's default autodiff (`ad` may
/// decline and hand them back), `flex(xs)` where they are plain burn-flex tensors, else
/// `Err(xs)`.
fn on_flex<B: Backend, const N: usize>(
    xs: [FloatTensor<B>; N],
    ad: impl FnOnce([AdTensor; N]) -> Result<AdTensor, [AdTensor; N]>,
    flex: impl FnOnce([FlexTensor; N]) -> FlexTensor,
) -> Result<FloatTensor<B>, [FloatTensor<B>; N]> {
    let xs = match downcast::<_, [AdTensor; N]>(xs) {
        Ok(xs) => return ad(xs).map(upcast).map_err(upcast),
        Err(xs) => xs,
    };
    downcast::<_, [FlexTensor; N]>(xs).map(|xs| upcast(flex(xs)))
}

/// `Ok(t as U)` where `T` is `U`, else `Err(t)`.
fn downcast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// The inverse of a successful [`downcast`]: values made from the caller's backend's tensors,
/// given back as that backend's type.
fn upcast<T: 'static, U: 'static>(t: T) -> U {
    downcast(t).unwrap_or_else(|_| unreachable!("the fused path returns the backend's own tensor type"))
}

fn tensor<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The tensor's values, contiguous.
fn values(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn from_vec(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn swiglu_flex(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let (g, u) = (values(gate), values(up));
    let mut out = vec![0.0; g.shape().num_elements()];
    kernels::swiglu_into(slice(&g), slice(&u), &mut out);
    from_vec(out, g.shape())
}

fn softmax_flex(scores: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let (x, bias) = (values(scores), values(bias));
    let [b, h, t, s] = x.shape().dims();
    let mut out = vec![0.0; b * h * t * s];
    let (x_all, bias_all) = (slice(&x), slice(&bias));
    // one `[len, keys]` block per (batch row, head); the bias block of the batch row
    for (block, (o, xs)) in out.chunks_exact_mut(t * s).zip(x_all.chunks_exact(t * s)).enumerate() {
        let bias = &bias_all[(block / h) * t * s..][..t * s];
        for ((o, xs), bias) in o.chunks_exact_mut(s).zip(xs.chunks_exact(s)).zip(bias.chunks_exact(s)) {
            kernels::softmax_biased(xs, bias, o);
        }
    }
    from_vec(out, x.shape())
}

/// `out`, computed from `inputs` on burn-flex, as an autodiff tensor whose backward is `op`
/// with `state` (kept only where an input needs a gradient).
fn record<Op: Backward<Flex, N>, const N: usize>(op: Op, inputs: [&AdTensor; N], state: Op::State, out: FlexTensor) -> AdTensor {
    match op.prepare::<NoCheckpointing>(inputs.map(|x| x.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// gate and up, contiguous
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let d_out = values(&grads.consume::<Flex>(&ops.node));
        let n = gate.shape().num_elements();
        let (mut d_gate, mut d_up) = (vec![0.0; n], vec![0.0; n]);
        kernels::swiglu_backward(slice(&gate), slice(&up), slice(&d_out), &mut d_gate, &mut d_up);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, from_vec(d_gate, gate.shape()));
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, from_vec(d_up, up.shape()));
        }
    }
}

fn swiglu_autodiff(gate: AdTensor, up: AdTensor) -> AdTensor {
    let (g, u) = (values(&gate.primitive), values(&up.primitive));
    let out = swiglu_flex(&g, &u);
    record(SwigluBackward, [&gate, &up], (g, u), out)
}

/// The backward of a row-wise op whose gradient needs only its output: the kernel maps
/// (output, output gradient) to the input gradient, rows along the last axis.
#[derive(Debug)]
struct RowsBackward(fn(&[f32], &[f32], &mut [f32], usize));

impl Backward<Flex, 1> for RowsBackward {
    /// the op's output, contiguous
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let out = ops.state;
        let d_out = values(&grads.consume::<Flex>(&ops.node));
        let [node] = ops.parents;
        if let Some(node) = node {
            let shape = out.shape();
            let mut d_x = vec![0.0; shape.num_elements()];
            (self.0)(slice(&out), slice(&d_out), &mut d_x, shape[shape.num_dims() - 1]);
            grads.register::<Flex>(node.id, from_vec(d_x, shape));
        }
    }
}

/// Records `out`, computed from `x` by a row-wise op, with the backward `kernel`.
fn rows_autodiff(x: &AdTensor, out: FlexTensor, kernel: fn(&[f32], &[f32], &mut [f32], usize)) -> AdTensor {
    record(RowsBackward(kernel), [x], out.clone(), out)
}

fn softmax_autodiff(scores: AdTensor, bias: &FlexTensor) -> AdTensor {
    rows_autodiff(&scores, softmax_flex(&scores.primitive, bias), kernels::softmax_backward)
}

fn log_softmax_flex(x: &FlexTensor) -> FlexTensor {
    let x = values(x);
    let shape = x.shape();
    let mut out = vec![0.0; shape.num_elements()];
    kernels::log_softmax_rows(slice(&x), &mut out, shape[shape.num_dims() - 1]);
    from_vec(out, shape)
}

fn log_softmax_autodiff(x: AdTensor) -> AdTensor {
    rows_autodiff(&x, log_softmax_flex(&x.primitive), kernels::log_softmax_backward)
}

fn rope_flex(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor) -> FlexTensor {
    let (x, cos, sin) = (values(x), values(cos), values(sin));
    let [b, t, n, d] = x.shape().dims();
    let mut out = vec![0.0; b * t * n * d];
    kernels::rope_to_heads(slice(&x), slice(&cos), slice(&sin), &mut out, [b, t, n, d]);
    from_vec(out, Shape::new([b, n, t, d]))
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// the cos and sin tables, contiguous
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        let d_y = values(&grads.consume::<Flex>(&ops.node));
        let [node] = ops.parents;
        if let Some(node) = node {
            let dims = cos.shape().dims();
            let mut d_x = vec![0.0; cos.shape().num_elements()];
            kernels::rope_to_heads_backward(slice(&d_y), slice(&cos), slice(&sin), &mut d_x, dims);
            grads.register::<Flex>(node.id, from_vec(d_x, cos.shape()));
        }
    }
}

fn rope_autodiff(x: AdTensor, cos: FlexTensor, sin: FlexTensor) -> AdTensor {
    let (cos, sin) = (values(&cos), values(&sin));
    let out = rope_flex(&x.primitive, &cos, &sin);
    record(RopeBackward, [&x], (cos, sin), out)
}

fn rms_norm_flex(x: &FlexTensor, gamma: &FlexTensor, eps: f32) -> FlexTensor {
    let (x, gamma) = (values(x), values(gamma));
    let mut out = vec![0.0; x.shape().num_elements()];
    kernels::rms_norm_into(slice(&x), slice(&gamma), eps, &mut out);
    from_vec(out, x.shape())
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// x and gamma, contiguous, and epsilon
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, eps) = ops.state;
        let d_y = values(&grads.consume::<Flex>(&ops.node));
        let (mut d_x, mut d_gamma) = (vec![0.0; x.shape().num_elements()], vec![0.0; gamma.shape().num_elements()]);
        kernels::rms_norm_backward(slice(&x), slice(&gamma), eps, slice(&d_y), &mut d_x, &mut d_gamma);
        let [x_node, gamma_node] = ops.parents;
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, from_vec(d_x, x.shape()));
        }
        if let Some(node) = gamma_node {
            grads.register::<Flex>(node.id, from_vec(d_gamma, gamma.shape()));
        }
    }
}

fn rms_norm_autodiff(x: AdTensor, gamma: AdTensor, eps: f32) -> AdTensor {
    let (xs, gs) = (values(&x.primitive), values(&gamma.primitive));
    let out = rms_norm_flex(&xs, &gs, eps);
    record(RmsNormBackward, [&x, &gamma], (xs, gs, eps), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::AutodiffModule;
    use burn::tensor::{Distribution, Tolerance};

    type Ad = Autodiff<Flex>;

    fn random<B: Backend, const D: usize>(shape: [usize; D], std: f64, seed: u64) -> Tensor<B, D> {
        B::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
    }

    /// A causal bias `[batch, 1, len, keys]` with the last key of batch row 1 masked (padding).
    fn causal_bias<B: Backend>(b: usize, t: usize) -> Tensor<B, 4> {
        let masked = crate::model::MASKED;
        let values: Vec<f32> = (0..b * t * t).map(|i| {
            let (row, q, k) = (i / (t * t), (i / t) % t, i % t);
            if k > q || (row == 1 && k == t - 1) { masked } else { 0.0 }
        }).collect();
        Tensor::from_data(TensorData::new(values, [b, 1, t, t]), &Default::default())
    }

    fn close<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>, what: &str) {
        let (got, want) = (got.into_data(), want.into_data());
        got.assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-5).set_relative(1e-5));
        eprintln!("{what}: ok");
    }

    #[test]
    fn swiglu_matches_burns_composition_with_gradients() {
        let (g, u, w) = (random::<Ad, 3>([2, 5, 37], 4.0, 1), random::<Ad, 3>([2, 5, 37], 1.0, 2), random::<Ad, 3>([2, 5, 37], 1.0, 3));
        let (g, u) = (g.require_grad(), u.require_grad());
        let fused = swiglu(g.clone(), u.clone());
        let composed = silu(g.clone()) * u.clone();
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "values");
        close(g.grad(&fused_grads).unwrap(), g.grad(&composed_grads).unwrap(), "d_gate");
        close(u.grad(&fused_grads).unwrap(), u.grad(&composed_grads).unwrap(), "d_up");
        // the dispatch took the fused path: bit-for-bit the fused kernel's values
        let direct = swiglu_flex(&g.clone().inner().into_primitive().tensor(), &u.clone().inner().into_primitive().tensor());
        assert_eq!(fused.inner().into_data(), Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(direct)).into_data());
        // without autodiff, and on a gate that needs no gradient
        close(swiglu(g.clone().inner(), u.clone().inner()), composed.clone().inner(), "flex values");
        let grads = (swiglu(g.clone().detach(), u.clone()) * w).sum().backward();
        assert!(g.grad(&grads).is_none());
        close(u.grad(&grads).unwrap(), u.grad(&composed_grads).unwrap(), "d_up alone");
    }

    #[test]
    fn masked_softmax_matches_burns_composition_with_gradients() {
        let (b, h, t) = (2, 3, 9);
        let x = random::<Ad, 4>([b, h, t, t], 3.0, 4).require_grad();
        let w = random::<Ad, 4>([b, h, t, t], 1.0, 5);
        let bias = causal_bias::<Ad>(b, t);
        let fused = masked_softmax(x.clone(), bias.clone());
        let composed = softmax(x.clone() + bias.clone(), 3);
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "probabilities");
        close(x.grad(&fused_grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_scores");
        let direct = softmax_flex(&x.clone().inner().into_primitive().tensor(), &bias.clone().inner().into_primitive().tensor());
        assert_eq!(fused.inner().into_data(), Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(direct)).into_data());
        close(masked_softmax(x.clone().inner(), bias.clone().inner()), composed.clone().inner(), "flex probabilities");
        // a bias that wants a gradient goes through burn's ops and gets one
        let bias = bias.require_grad();
        let grads = (masked_softmax(x.clone(), bias.clone()) * w).sum().backward();
        assert!(bias.grad(&grads).is_some(), "a tracked bias is differentiated");
        close(x.grad(&grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_scores with a tracked bias");
    }

    #[test]
    fn rope_heads_matches_burns_rotation_with_gradients() {
        let shape = [2, 5, 3, 8];
        let x = random::<Ad, 4>(shape, 1.0, 12).require_grad();
        let (cos, sin) = (random::<Ad, 4>(shape, 1.0, 13), random::<Ad, 4>(shape, 1.0, 14));
        let w = random::<Ad, 4>([2, 3, 5, 8], 1.0, 15);
        let fused = rope_heads(x.clone(), &(cos.clone(), sin.clone()));
        let composed = rotate(x.clone(), cos.clone(), sin.clone()).swap_dims(1, 2);
        assert_eq!(fused.dims(), [2, 3, 5, 8]);
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "rotated");
        close(x.grad(&fused_grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_x");
        let direct = rope_flex(&x.clone().inner().into_primitive().tensor(), &cos.clone().inner().into_primitive().tensor(), &sin.clone().inner().into_primitive().tensor());
        assert_eq!(fused.inner().into_data(), Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(direct)).into_data());
        close(rope_heads(x.clone().inner(), &(cos.clone().inner(), sin.clone().inner())), composed.inner(), "flex rotated");
    }

    #[test]
    fn rms_norm_matches_burns_module_with_gradients() {
        let device = Default::default();
        let mut norm = burn::nn::RmsNormConfig::new(40).with_epsilon(1e-6).init::<Ad>(&device);
        norm.gamma = burn::module::Param::from_tensor(random::<Ad, 1>([40], 1.0, 16));
        let x = random::<Ad, 3>([2, 7, 40], 2.0, 17).require_grad();
        let w = random::<Ad, 3>([2, 7, 40], 1.0, 18);
        let fused = rms_norm(&norm, x.clone());
        let composed = norm.forward(x.clone());
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "normalised");
        close(x.grad(&fused_grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_x");
        close(norm.gamma.grad(&fused_grads).unwrap(), norm.gamma.grad(&composed_grads).unwrap(), "d_gamma");
        let gamma = norm.gamma.val().inner().into_primitive().tensor();
        let direct = rms_norm_flex(&x.clone().inner().into_primitive().tensor(), &gamma, 1e-6);
        assert_eq!(fused.inner().into_data(), Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(direct)).into_data());
        close(rms_norm(&norm.valid(), x.inner()), composed.inner(), "flex normalised");
    }

    #[test]
    fn log_softmax_matches_burns_with_gradients() {
        let x = random::<Ad, 3>([2, 7, 300], 5.0, 10).require_grad();
        let w = random::<Ad, 3>([2, 7, 300], 1.0, 11);
        let fused = log_softmax(x.clone());
        let composed = activation::log_softmax(x.clone(), 2);
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "log-probabilities");
        close(x.grad(&fused_grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_logits");
        let direct = log_softmax_flex(&x.clone().inner().into_primitive().tensor());
        assert_eq!(fused.inner().into_data(), Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(direct)).into_data());
        close(log_softmax(x.inner()), composed.inner(), "flex log-probabilities");
    }

    #[test]
    fn other_dtypes_and_shapes_use_burns_ops() {
        let (g, u) = (random::<Flex, 2>([4, 6], 2.0, 6), random::<Flex, 2>([4, 6], 1.0, 7));
        let want = (silu(g.clone()) * u.clone()).cast(DType::BF16).into_data();
        let got = swiglu(g.clone().cast(DType::BF16), u.clone().cast(DType::BF16)).into_data();
        got.assert_approx_eq::<half::bf16>(&want, Tolerance::absolute(0.05).set_relative(0.05));
        // a bias per head (not shared) is added by broadcasting as usual
        let x = random::<Flex, 4>([1, 2, 3, 3], 1.0, 8);
        let bias = random::<Flex, 4>([1, 2, 3, 3], 1.0, 9);
        close(masked_softmax(x.clone(), bias.clone()), softmax(x + bias, 3), "per-head bias");
    }
}
