//! Activation checkpointing: gradients of a loss on the model's logits with only one decoder
//! layer's activations alive at a time.
//!
//! With `train.activation_checkpointing = "layer"` the forward pass runs without autodiff,
//! keeping just each layer's input. The backward pass then goes from the head down: the head
//! and the loss run with autodiff from the last hidden states, then each layer is recomputed
//! from its saved input and differentiated with the gradient of its output, `∂(y · g)/∂θ`,
//! which is the chain rule's product, and so on to the embedding. The cost is one more forward
//! pass of the layers (about a third more compute); the memory is the layer inputs plus one
//! layer's activations, instead of every layer's. The parts are plain burn code on any
//! backend; gradients are the non-checkpointed ones up to float summation order (tested on
//! flex and wgpu).

use t1_model::FusedAutodiff;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use t1_model::{Inputs, Qwen2};

/// What the backward pass keeps (`train.activation_checkpointing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Every activation of the forward pass is kept for the backward pass.
    #[default]
    None,
    /// Each decoder layer is recomputed in the backward pass from its input.
    Layer,
}

/// Gradients of `loss(logits)` for the model's parameters, its value, and what `loss` returns
/// besides (statistics). `loss` gets the logits of `inputs`, `[batch, len, vocab]`.
pub fn loss_grads<B: FusedAutodiff, E>(
    model: &Qwen2<B>,
    inputs: &Inputs,
    mode: ActivationCheckpointing,
    loss: impl FnOnce(Tensor<B, 3>) -> (Tensor<B, 1>, E),
) -> (GradientsParams, f32, E) {
    if mode == ActivationCheckpointing::None {
        let (l, extra) = loss(model.forward(inputs, None));
        let value = crate::common::scalar(l.clone());
        return (GradientsParams::from_grads(l.backward(), model), value, extra);
    }
    // forward without autodiff, keeping each layer's input
    let inner = model.valid();
    let shared = inner.layer_inputs(inputs);
    let mut saved = vec![inner.embed(inputs)];
    for i in 0..inner.num_layers() {
        let x = saved.last().expect("one input per layer").clone();
        saved.push(inner.layer(i, x, &shared));
    }
    drop(shared);
    let mut accum = GradientsAccumulator::<Qwen2<B>>::new();
    // the head and the loss, from the last hidden states
    let x = Tensor::<B, 3>::from_inner(saved.pop().expect("last hidden states")).require_grad();
    let (l, extra) = loss(model.head(x.clone()));
    let value = crate::common::scalar(l.clone());
    let grads = l.backward();
    let mut upstream = x.grad(&grads);
    accum.accumulate(model, GradientsParams::from_grads(grads, model));
    // each layer, recomputed from its input, last first
    let shared = model.layer_inputs(inputs);
    for i in (0..model.num_layers()).rev() {
        let x = Tensor::<B, 3>::from_inner(saved.pop().expect("one input per layer")).require_grad();
        let Some(g) = upstream.take() else { break };
        let grads = (model.layer(i, x.clone(), &shared) * Tensor::from_inner(g)).sum().backward();
        upstream = x.grad(&grads);
        accum.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    // the embedding (its gradient adds to the head's when they are tied); nothing to do when
    // it is frozen (LoRA)
    if let Some(g) = upstream.filter(|_| model.embed_tokens.weight.val().is_require_grad()) {
        let grads = (model.embed(inputs) * Tensor::from_inner(g)).sum().backward();
        accum.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    (accum.grads(), value, extra)
}
