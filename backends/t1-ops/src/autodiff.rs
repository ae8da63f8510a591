//! [`FusedOps`] on `Autodiff<B>`: each operation runs `B`'s forward and is one node of the
//! graph, whose backward is `B`'s `*_backward` method (a kernel where `B` has one, burn's ops
//! otherwise). Inputs that need no gradient get none; the state a backward needs is kept only
//! when some input is tracked. Inputs broadcast against each other (shapes whose gradients the
//! nodes do not reduce) go through burn's composition and its autodiff.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::{compose, FusedOps};

type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    const HOST_MEMORY: bool = B::HOST_MEMORY;

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        if gate.dims() != up.dims() {
            return compose::swiglu(gate, up);
        }
        let (gate, up) = (prim(gate), prim(up));
        let out = B::swiglu(inner::<B, C, D>(&gate), inner::<B, C, _>(&up));
        record::<B, C, _, 2, _>(SwigluBackward::<D>, [&gate, &up], |_| (gate.primitive.clone(), up.primitive.clone()), out)
    }

    fn masked_softmax(scores: Tensor<Self, 4>, bias: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let [b, h, t, s] = scores.dims();
        if bias.dims() != [b, 1, t, s] && bias.dims() != [b, h, t, s] {
            return compose::masked_softmax(scores, bias);
        }
        let (scores, bias) = (prim(scores), prim(bias));
        let bias_heads = bias.primitive.shape()[1];
        let out = B::masked_softmax(inner::<B, C, 4>(&scores), inner::<B, C, _>(&bias));
        record::<B, C, _, 2, _>(MaskedSoftmaxBackward { bias_heads }, [&scores, &bias], |out| out.clone(), out)
    }

    fn log_softmax_last<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        let x = prim(x);
        let out = B::log_softmax_last(inner::<B, C, D>(&x));
        record::<B, C, _, 1, _>(LogSoftmaxBackward::<D>, [&x], |out| out.clone(), out)
    }

    fn rope_heads(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        if cos.dims() != x.dims() || sin.dims() != x.dims() {
            return compose::rope_heads(x, cos, sin);
        }
        let (x, cos, sin) = (prim(x), prim(cos), prim(sin));
        let out = B::rope_heads(inner::<B, C, 4>(&x), inner::<B, C, _>(&cos), inner::<B, C, _>(&sin));
        // `x` is needed only for the tables' own gradients (they are constants in the model)
        let keep_x = cos.is_tracked() || sin.is_tracked();
        let state = |_: &FloatTensor<B>| (keep_x.then(|| x.primitive.clone()), cos.primitive.clone(), sin.primitive.clone());
        record::<B, C, _, 3, _>(RopeBackward, [&x, &cos, &sin], state, out)
    }

    fn rms_norm<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, D> {
        let (x, gamma) = (prim(x), prim(gamma));
        let out = B::rms_norm(inner::<B, C, D>(&x), inner::<B, C, _>(&gamma), eps);
        record::<B, C, _, 2, _>(RmsNormBackward::<D>(eps), [&x, &gamma], |_| (x.primitive.clone(), gamma.primitive.clone()), out)
    }
}

fn prim<B: Backend, C: CheckpointStrategy, const D: usize>(x: Tensor<Autodiff<B, C>, D>) -> AdTensor<B, C> {
    x.into_primitive().tensor()
}

/// The inner backend's tensor of an autodiff tensor.
fn inner<B: Backend, C: CheckpointStrategy, const D: usize>(x: &AdTensor<B, C>) -> Tensor<B, D> {
    tensor(x.primitive.clone())
}

fn tensor<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn float<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}

/// `out`, computed by `B` from `inputs`, as a node whose backward is `op` with the state
/// `state(&out)` (made only when an input is tracked).
fn record<B: Backend, C: CheckpointStrategy, Op: Backward<B, N>, const N: usize, const D: usize>(
    op: Op,
    inputs: [&AdTensor<B, C>; N],
    state: impl FnOnce(&FloatTensor<B>) -> Op::State,
    out: Tensor<B, D>,
) -> Tensor<Autodiff<B, C>, D> {
    let out = float(out);
    let node = match op.prepare::<C>(inputs.map(|x| x.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = state(&out);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(node))
}

/// Registers `grad` for `parent` when it is tracked.
fn register<B: Backend, const D: usize>(grads: &mut Gradients, parent: Option<NodeId>, grad: impl FnOnce() -> Tensor<B, D>) {
    if let Some(id) = parent {
        grads.register::<B>(id, float(grad()));
    }
}

#[derive(Debug)]
struct SwigluBackward<const D: usize>;

impl<B: FusedOps, const D: usize> Backward<B, 2> for SwigluBackward<D> {
    /// gate and up
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let d_out = tensor::<B, D>(grads.consume::<B>(&ops.node));
        let (d_gate, d_up) = B::swiglu_backward(tensor::<B, D>(gate), tensor(up), d_out);
        let [gate, up] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        register(grads, gate, || d_gate);
        register(grads, up, || d_up);
    }
}

#[derive(Debug)]
struct MaskedSoftmaxBackward {
    /// 1 for a bias shared by the heads, whose gradient is then summed over them
    bias_heads: usize,
}

impl<B: FusedOps> Backward<B, 2> for MaskedSoftmaxBackward {
    /// the probabilities
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_probs = tensor::<B, 4>(grads.consume::<B>(&ops.node));
        let d_scores = B::softmax_backward(tensor::<B, 4>(ops.state), d_probs);
        let [scores, bias] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        let heads = d_scores.dims()[1];
        let d_bias = (bias.is_some()).then(|| if self.bias_heads == 1 && heads > 1 { d_scores.clone().sum_dim(1) } else { d_scores.clone() });
        register(grads, scores, || d_scores);
        register(grads, bias, || d_bias.expect("made for a tracked bias"));
    }
}

#[derive(Debug)]
struct LogSoftmaxBackward<const D: usize>;

impl<B: FusedOps, const D: usize> Backward<B, 1> for LogSoftmaxBackward<D> {
    /// the log-probabilities
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_y = tensor::<B, D>(grads.consume::<B>(&ops.node));
        let [x] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        register(grads, x, || B::log_softmax_last_backward(tensor::<B, D>(ops.state), d_y));
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FusedOps> Backward<B, 3> for RopeBackward {
    /// x (kept only when a table is tracked), cos and sin
    type State = (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, cos, sin) = ops.state;
        let (cos, sin) = (tensor::<B, 4>(cos), tensor::<B, 4>(sin));
        let d_y = tensor::<B, 4>(grads.consume::<B>(&ops.node));
        let [x_node, cos_node, sin_node] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        if cos_node.is_some() || sin_node.is_some() {
            // y = x · cos + rotate_half(x) · sin, element-wise in the [batch, len, heads, d] layout
            let x = tensor::<B, 4>(x.expect("kept for tracked tables"));
            let d_y = d_y.clone().swap_dims(1, 2);
            register(grads, cos_node, || d_y.clone() * x.clone());
            register(grads, sin_node, || d_y * compose::rotate_half(x));
        }
        register(grads, x_node, || B::rope_heads_backward(d_y, cos, sin));
    }
}

#[derive(Debug)]
struct RmsNormBackward<const D: usize>(f64);

impl<B: FusedOps, const D: usize> Backward<B, 2> for RmsNormBackward<D> {
    /// x and gamma
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma) = ops.state;
        let d_y = tensor::<B, D>(grads.consume::<B>(&ops.node));
        let (d_x, d_gamma) = B::rms_norm_backward(tensor::<B, D>(x), tensor(gamma), self.0, d_y);
        let [x, gamma] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        register(grads, x, || d_x);
        register(grads, gamma, || d_gamma);
    }
}
