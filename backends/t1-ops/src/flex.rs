//! [`FusedOps`] on burn-flex: each operation is one pass over f32 host slices
//! ([`crate::kernels`]), forward and backward; other dtypes and shapes compose burn's ops.
//! The kernels run on the calling thread: on the CPU, training gets its parallelism from the
//! data-parallel shards (`train.threads`), one thread each. NaN inputs give NaN outputs, so a
//! diverged loss is still caught by the trainer.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use crate::{compose, kernels, FusedOps};

impl FusedOps for Flex {
    const HOST_MEMORY: bool = true;

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        if !f32s(&[&gate, &up]) || gate.dims() != up.dims() {
            return compose::swiglu(gate, up);
        }
        let (g, u) = (values(prim(gate)), values(prim(up)));
        let mut out = vec![0.0; g.shape().num_elements()];
        kernels::swiglu_into(slice(&g), slice(&u), &mut out);
        tensor(from_vec(out, g.shape()))
    }

    fn swiglu_backward<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>, d_out: Tensor<Self, D>) -> (Tensor<Self, D>, Tensor<Self, D>) {
        if !f32s(&[&gate, &up, &d_out]) || gate.dims() != up.dims() || gate.dims() != d_out.dims() {
            return compose::swiglu_backward(gate, up, d_out);
        }
        let (g, u, d) = (values(prim(gate)), values(prim(up)), values(prim(d_out)));
        let n = g.shape().num_elements();
        let (mut d_gate, mut d_up) = (vec![0.0; n], vec![0.0; n]);
        kernels::swiglu_backward(slice(&g), slice(&u), slice(&d), &mut d_gate, &mut d_up);
        (tensor(from_vec(d_gate, g.shape())), tensor(from_vec(d_up, g.shape())))
    }

    fn masked_softmax(scores: Tensor<Self, 4>, bias: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let [b, h, t, s] = scores.dims();
        if !f32s(&[&scores, &bias]) || bias.dims() != [b, 1, t, s] {
            return compose::masked_softmax(scores, bias);
        }
        let (x, bias) = (values(prim(scores)), values(prim(bias)));
        let mut out = vec![0.0; b * h * t * s];
        let (x_all, bias_all) = (slice(&x), slice(&bias));
        // one `[len, keys]` block per (batch row, head); the bias block of the batch row
        for (block, (o, xs)) in out.chunks_exact_mut(t * s).zip(x_all.chunks_exact(t * s)).enumerate() {
            let bias = &bias_all[(block / h) * t * s..][..t * s];
            for ((o, xs), bias) in o.chunks_exact_mut(s).zip(xs.chunks_exact(s)).zip(bias.chunks_exact(s)) {
                kernels::softmax_biased(xs, bias, o);
            }
        }
        tensor(from_vec(out, x.shape()))
    }

    fn softmax_backward<const D: usize>(probs: Tensor<Self, D>, d_probs: Tensor<Self, D>) -> Tensor<Self, D> {
        rows_backward(probs, d_probs, kernels::softmax_backward).unwrap_or_else(|(p, d)| compose::softmax_backward(p, d))
    }

    fn log_softmax_last<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        if !f32s(&[&x]) {
            return compose::log_softmax(x);
        }
        let x = values(prim(x));
        let shape = x.shape();
        let mut out = vec![0.0; shape.num_elements()];
        kernels::log_softmax_rows(slice(&x), &mut out, shape[D - 1]);
        tensor(from_vec(out, shape))
    }

    fn log_softmax_last_backward<const D: usize>(logp: Tensor<Self, D>, d_y: Tensor<Self, D>) -> Tensor<Self, D> {
        rows_backward(logp, d_y, kernels::log_softmax_backward).unwrap_or_else(|(p, d)| compose::log_softmax_backward(p, d))
    }

    fn rope_heads(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        if !f32s(&[&x, &cos, &sin]) || cos.dims() != x.dims() || sin.dims() != x.dims() {
            return compose::rope_heads(x, cos, sin);
        }
        let [b, t, n, d] = x.dims();
        let (x, cos, sin) = (values(prim(x)), values(prim(cos)), values(prim(sin)));
        let mut out = vec![0.0; b * t * n * d];
        kernels::rope_to_heads(slice(&x), slice(&cos), slice(&sin), &mut out, [b, t, n, d]);
        tensor(from_vec(out, Shape::new([b, n, t, d])))
    }

    fn rope_heads_backward(d_y: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let [b, t, n, d] = cos.dims();
        if !f32s(&[&d_y, &cos, &sin]) || sin.dims() != cos.dims() || d_y.dims() != [b, n, t, d] {
            return compose::rope_heads_backward(d_y, cos, sin);
        }
        let (d_y, cos, sin) = (values(prim(d_y)), values(prim(cos)), values(prim(sin)));
        let mut d_x = vec![0.0; b * t * n * d];
        kernels::rope_to_heads_backward(slice(&d_y), slice(&cos), slice(&sin), &mut d_x, [b, t, n, d]);
        tensor(from_vec(d_x, cos.shape()))
    }

    fn rms_norm<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, D> {
        if !f32s(&[&x]) || !f32s(&[&gamma]) || gamma.dims()[0] != x.dims()[D - 1] {
            return compose::rms_norm(x, gamma, eps);
        }
        let (x, gamma) = (values(prim(x)), values(prim(gamma)));
        let mut out = vec![0.0; x.shape().num_elements()];
        kernels::rms_norm_into(slice(&x), slice(&gamma), eps as f32, &mut out);
        tensor(from_vec(out, x.shape()))
    }

    fn rms_norm_backward<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64, d_y: Tensor<Self, D>) -> (Tensor<Self, D>, Tensor<Self, 1>) {
        if !f32s(&[&x, &d_y]) || !f32s(&[&gamma]) || gamma.dims()[0] != x.dims()[D - 1] || d_y.dims() != x.dims() {
            return compose::rms_norm_backward(x, gamma, eps, d_y);
        }
        let (x, gamma, d_y) = (values(prim(x)), values(prim(gamma)), values(prim(d_y)));
        let (mut d_x, mut d_gamma) = (vec![0.0; x.shape().num_elements()], vec![0.0; gamma.shape().num_elements()]);
        kernels::rms_norm_backward(slice(&x), slice(&gamma), eps as f32, slice(&d_y), &mut d_x, &mut d_gamma);
        (tensor(from_vec(d_x, x.shape())), tensor(from_vec(d_gamma, gamma.shape())))
    }
}

/// The backward of a row-wise op whose gradient needs only its output: `kernel` maps (output,
/// output gradient) to the input gradient, rows along the last axis; other dtypes and shapes
/// are handed back.
#[allow(clippy::type_complexity)]
fn rows_backward<const D: usize>(
    out: Tensor<Flex, D>,
    d_out: Tensor<Flex, D>,
    kernel: fn(&[f32], &[f32], &mut [f32], usize),
) -> Result<Tensor<Flex, D>, (Tensor<Flex, D>, Tensor<Flex, D>)> {
    if !f32s(&[&out, &d_out]) || out.dims() != d_out.dims() {
        return Err((out, d_out));
    }
    let (out, d_out) = (values(prim(out)), values(prim(d_out)));
    let shape = out.shape();
    let mut d_x = vec![0.0; shape.num_elements()];
    kernel(slice(&out), slice(&d_out), &mut d_x, shape[D - 1]);
    Ok(tensor(from_vec(d_x, shape)))
}

fn f32s<const D: usize>(xs: &[&Tensor<Flex, D>]) -> bool {
    xs.iter().all(|x| x.dtype() == DType::F32)
}

fn prim<const D: usize>(x: Tensor<Flex, D>) -> FlexTensor {
    x.into_primitive().tensor()
}

fn tensor<const D: usize>(primitive: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The tensor's values, contiguous.
fn values(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn from_vec(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::tensor::backend::Backend;
    use burn::tensor::{activation::softmax, Distribution, Tolerance};

    type Ad = Autodiff<Flex>;

    fn random<B: Backend, const D: usize>(shape: [usize; D], std: f64, seed: u64) -> Tensor<B, D> {
        B::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
    }

    /// A causal bias `[batch, 1, len, keys]` with the last key of batch row 1 masked (padding).
    fn causal_bias<B: Backend>(b: usize, t: usize) -> Tensor<B, 4> {
        let values: Vec<f32> = (0..b * t * t)
            .map(|i| {
                let (row, q, k) = (i / (t * t), (i / t) % t, i % t);
                if k > q || (row == 1 && k == t - 1) { -1e9 } else { 0.0 }
            })
            .collect();
        Tensor::from_data(TensorData::new(values, [b, 1, t, t]), &Default::default())
    }

    fn close<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>, what: &str) {
        let (got, want) = (got.into_data(), want.into_data());
        got.assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-5).set_relative(1e-5));
        eprintln!("{what}: ok");
    }

    /// Values and gradients (of `sum(y · w)`) of the fused op on `Autodiff<Flex>` against burn's
    /// composition, for the tracked `inputs`; the fused values are bit for bit those of the
    /// kernel on plain `Flex`.
    fn check<const N: usize, const D: usize>(
        inputs: [Tensor<Ad, D>; N],
        fused: impl Fn([Tensor<Ad, D>; N]) -> Tensor<Ad, D>,
        composed: impl Fn([Tensor<Ad, D>; N]) -> Tensor<Ad, D>,
        plain: impl Fn([Tensor<Flex, D>; N]) -> Tensor<Flex, D>,
    ) {
        let inputs = inputs.map(|x| x.require_grad());
        let (y_fused, y_composed) = (fused(inputs.clone()), composed(inputs.clone()));
        let w = random::<Ad, D>(y_fused.dims(), 1.0, 99);
        let [g_fused, g_composed] = [y_fused.clone(), y_composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(y_fused.clone().inner(), y_composed.inner(), "values");
        for (i, x) in inputs.iter().enumerate() {
            close(x.grad(&g_fused).expect("a gradient"), x.grad(&g_composed).expect("a gradient"), &format!("gradient {i}"));
        }
        assert_eq!(y_fused.inner().into_data(), plain(inputs.map(|x| x.inner())).into_data());
    }

    #[test]
    fn swiglu_matches_burns_composition_with_gradients() {
        let inputs = [random::<Ad, 3>([2, 5, 37], 4.0, 1), random::<Ad, 3>([2, 5, 37], 1.0, 2)];
        check(inputs.clone(), |[g, u]| Ad::swiglu(g, u), |[g, u]| compose::swiglu(g, u), |[g, u]| Flex::swiglu(g, u));
        // a gate that needs no gradient gets none
        let [g, u] = inputs.map(|x| x.require_grad());
        let grads = Ad::swiglu(g.clone().detach(), u.clone()).sum().backward();
        assert!(g.grad(&grads).is_none() && u.grad(&grads).is_some());
    }

    #[test]
    fn masked_softmax_matches_burns_composition_with_gradients() {
        let (b, h, t) = (2, 3, 9);
        let x = random::<Ad, 4>([b, h, t, t], 3.0, 4);
        let bias = causal_bias::<Ad>(b, t);
        let with = |f: fn(Tensor<Ad, 4>, Tensor<Ad, 4>) -> Tensor<Ad, 4>| {
            let bias = bias.clone();
            move |[x]: [Tensor<Ad, 4>; 1]| f(x, bias.clone())
        };
        let bias_inner = bias.clone().inner();
        check([x.clone()], with(Ad::masked_softmax), with(|x, bias| softmax(x + bias, 3)), |[x]| Flex::masked_softmax(x, bias_inner.clone()));
        // a bias that wants a gradient gets the one of burn's composition (summed over the heads)
        check([x, bias], |[x, bias]| Ad::masked_softmax(x, bias), |[x, bias]| softmax(x + bias, 3), |[x, bias]| Flex::masked_softmax(x, bias));
    }

    #[test]
    fn rope_heads_matches_burns_rotation_with_gradients() {
        let shape = [2, 5, 3, 8];
        let [x, cos, sin] = [12, 13, 14].map(|seed| random::<Ad, 4>(shape, 1.0, seed));
        let (c, s) = (cos.clone(), sin.clone());
        let (ci, si) = (cos.clone().inner(), sin.clone().inner());
        check([x.clone()], |[x]| Ad::rope_heads(x, c.clone(), s.clone()), |[x]| compose::rope_heads(x, c.clone(), s.clone()), |[x]| Flex::rope_heads(x, ci.clone(), si.clone()));
        assert_eq!(Ad::rope_heads(x.clone(), cos.clone(), sin.clone()).dims(), [2, 3, 5, 8]);
        // tracked tables get their gradients too
        check([x, cos, sin], |[x, c, s]| Ad::rope_heads(x, c, s), |[x, c, s]| compose::rope_heads(x, c, s), |[x, c, s]| Flex::rope_heads(x, c, s));
    }

    #[test]
    fn rms_norm_matches_burns_module_with_gradients() {
        let device = Default::default();
        let mut norm = burn::nn::RmsNormConfig::new(40).with_epsilon(1e-6).init::<Ad>(&device);
        norm.gamma = burn::module::Param::from_tensor(random::<Ad, 1>([40], 1.0, 16));
        let x = random::<Ad, 3>([2, 7, 40], 2.0, 17).require_grad();
        let w = random::<Ad, 3>([2, 7, 40], 1.0, 18);
        let fused = Ad::rms_norm(x.clone(), norm.gamma.val(), norm.epsilon);
        let composed = norm.forward(x.clone());
        let [fused_grads, composed_grads] = [fused.clone(), composed.clone()].map(|y| (y * w.clone()).sum().backward());
        close(fused.clone().inner(), composed.clone().inner(), "normalised");
        close(x.grad(&fused_grads).unwrap(), x.grad(&composed_grads).unwrap(), "d_x");
        close(norm.gamma.grad(&fused_grads).unwrap(), norm.gamma.grad(&composed_grads).unwrap(), "d_gamma");
        let plain = Flex::rms_norm(x.clone().inner(), norm.gamma.val().inner(), 1e-6);
        assert_eq!(fused.inner().into_data(), plain.into_data());
        // burn's composition of the backward, on the inner backend, agrees with the kernel's
        let d_y = w.inner();
        let (kernel, composed) = (
            Flex::rms_norm_backward(x.clone().inner(), norm.gamma.val().inner(), 1e-6, d_y.clone()),
            compose::rms_norm_backward(x.inner(), norm.gamma.val().inner(), 1e-6, d_y),
        );
        close(kernel.0, composed.0, "composed d_x");
        close(kernel.1, composed.1, "composed d_gamma");
    }

    #[test]
    fn log_softmax_matches_burns_with_gradients() {
        let x = random::<Ad, 3>([2, 7, 300], 5.0, 10);
        check([x], |[x]| Ad::log_softmax_last(x), |[x]| compose::log_softmax(x), |[x]| Flex::log_softmax_last(x));
    }

    #[test]
    fn composed_backwards_match_burns_autodiff() {
        // the default `*_backward` bodies (what `Autodiff<B>` runs on a backend without
        // kernels), run here on burn-flex's plain ops, against burn's autodiff of the forward
        // composition
        type AdNd = Autodiff<Flex>;
        let shape = [2, 3, 4, 6];
        let [a, b, w] = [20, 21, 22].map(|seed| random::<AdNd, 4>(shape, 2.0, seed));
        let (a, b) = (a.require_grad(), b.require_grad());
        let grads = (compose::swiglu(a.clone(), b.clone()) * w.clone()).sum().backward();
        let (d_a, d_b) = compose::swiglu_backward(a.clone().inner(), b.clone().inner(), w.clone().inner());
        close(d_a, a.grad(&grads).unwrap(), "swiglu d_gate");
        close(d_b, b.grad(&grads).unwrap(), "swiglu d_up");
        for (name, f, back) in [
            ("softmax", (|x| softmax(x, 3)) as fn(Tensor<AdNd, 4>) -> Tensor<AdNd, 4>, compose::softmax_backward::<Flex, 4> as fn(_, _) -> _),
            ("log_softmax", compose::log_softmax::<AdNd, 4>, compose::log_softmax_backward::<Flex, 4>),
        ] {
            let y = f(a.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            close(back(y.inner(), w.clone().inner()), a.grad(&grads).unwrap(), name);
        }
        let (cos, sin) = (random::<AdNd, 4>(shape, 1.0, 23), random::<AdNd, 4>(shape, 1.0, 24));
        let y = compose::rope_heads(a.clone(), cos.clone(), sin.clone());
        let w_heads = w.clone().swap_dims(1, 2);
        let grads = (y * w_heads.clone()).sum().backward();
        close(compose::rope_heads_backward(w_heads.inner(), cos.inner(), sin.inner()), a.grad(&grads).unwrap(), "rope d_x");
    }

    /// bf16 takes the same graph nodes as f32 (with burn's ops inside them on burn-flex): their
    /// gradients against burn's autodiff of the composition, within bf16's precision.
    #[test]
    fn bf16_gradients_match_burns_autodiff_of_the_composition() {
        let bf16 = |x: Tensor<Ad, 3>| x.cast(DType::BF16).require_grad();
        let (a, b, w) = (bf16(random([2, 5, 40], 2.0, 30)), bf16(random([2, 5, 40], 1.0, 31)), random::<Ad, 3>([2, 5, 40], 1.0, 32).cast(DType::BF16));
        let gamma = random::<Ad, 1>([40], 1.0, 33).cast(DType::BF16).require_grad();
        let grads = |y: Tensor<Ad, 3>| (y * w.clone()).sum().backward();
        let close = |got: Tensor<Flex, 3>, want: Tensor<Flex, 3>, what: &str| {
            let (got, want) = (got.cast(DType::F32).into_data().to_vec::<f32>().unwrap(), want.cast(DType::F32).into_data().to_vec::<f32>().unwrap());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(diff <= 0.03 * scale, "{what}: max difference {diff} against a largest entry of {scale}");
        };
        let (fused, composed) = (grads(Ad::swiglu(a.clone(), b.clone())), grads(compose::swiglu(a.clone(), b.clone())));
        close(a.grad(&fused).unwrap(), a.grad(&composed).unwrap(), "swiglu d_gate");
        close(b.grad(&fused).unwrap(), b.grad(&composed).unwrap(), "swiglu d_up");
        let (fused, composed) = (grads(Ad::log_softmax_last(a.clone())), grads(compose::log_softmax(a.clone())));
        close(a.grad(&fused).unwrap(), a.grad(&composed).unwrap(), "log_softmax");
        let (fused, composed) = (grads(Ad::rms_norm(a.clone(), gamma.clone(), 1e-6)), grads(compose::rms_norm(a.clone(), gamma.clone(), 1e-6)));
        close(a.grad(&fused).unwrap(), a.grad(&composed).unwrap(), "rms_norm d_x");
        let (g_fused, g_composed) = (gamma.grad(&fused).unwrap().reshape([1, 1, 40]), gamma.grad(&composed).unwrap().reshape([1, 1, 40]));
        close(g_fused, g_composed, "rms_norm d_gamma");
    }

    #[test]
    fn other_dtypes_and_shapes_use_burns_ops() {
        let (g, u) = (random::<Flex, 2>([4, 6], 2.0, 6), random::<Flex, 2>([4, 6], 1.0, 7));
        let want = (silu_of(g.clone()) * u.clone()).cast(DType::BF16).into_data();
        let got = Flex::swiglu(g.clone().cast(DType::BF16), u.clone().cast(DType::BF16)).into_data();
        got.assert_approx_eq::<half::bf16>(&want, Tolerance::absolute(0.05).set_relative(0.05));
        // a bias per head (not shared) is added by broadcasting as usual
        let x = random::<Flex, 4>([1, 2, 3, 3], 1.0, 8);
        let bias = random::<Flex, 4>([1, 2, 3, 3], 1.0, 9);
        close(Flex::masked_softmax(x.clone(), bias.clone()), softmax(x + bias, 3), "per-head bias");
    }

    fn silu_of<const D: usize>(x: Tensor<Flex, D>) -> Tensor<Flex, D> {
        burn::tensor::activation::silu(x)
    }
}
