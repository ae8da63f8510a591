//! The Qwen2 / Qwen2.5 decoder (`Qwen2ForCausalLM`), generic over the burn backend.
//!
//! Reads like the HF config: token embedding → `num_hidden_layers` × (RMSNorm → grouped-query
//! attention with rotary embeddings, q/k/v bias and no o_proj bias → residual → RMSNorm →
//! SwiGLU MLP → residual) → RMSNorm → `lm_head` (tied to the embedding or not).
//! Field names are the checkpoint's tensor names (`model.layers.{i}.self_attn.q_proj.weight`),
//! so loading in `hf.rs` is a mapping one can read. LoRA adapters (`lora.rs`, PEFT's layout)
//! add `s · x A B` to the projections they target.
//!
//! Masks and rotary tables are computed on the host from the padding mask ([`Inputs`]), so
//! the same code serves full forward passes, left/right padded batches and KV-cache decoding.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use t1_ops::FusedOps;

use crate::config::Qwen2Config;
use crate::lora::{LayerLora, Lora, LoraPair};

/// Added to the attention score of a masked key. Finite, so that a fully masked row (a padding
/// query) gives a uniform distribution instead of NaN.
pub const MASKED: f32 = -1e9;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    /// Qwen2's quirk: no bias on the output projection.
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

/// `Qwen2ForCausalLM`. `lm_head` is `None` when the embeddings are tied.
#[derive(Module, Debug)]
pub struct Qwen2<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Option<Linear<B>>,
    pub rope_theta: f64,
    /// LoRA adapters on the layers' projections (`lora.rs`), `None` for the plain model.
    /// Last, so the base's parameter ids are the same with and without them.
    pub lora: Option<Lora<B>>,
}

/// Per-layer keys and values of the tokens seen so far, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values `[batch, num_kv_heads, seen, head_dim]`.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// A cache of these per-layer keys and values (see [`Self::into_layers`]).
    pub fn from_layers(layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>) -> Self {
        Self { layers }
    }

    /// Per layer: keys and values `[batch, num_kv_heads, seen, head_dim]`, `None` before the
    /// first call.
    pub fn into_layers(self) -> Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>> {
        self.layers
    }

    /// The caches of batch shards (same length, e.g. prefilled on separate threads) as one
    /// cache of their rows in order.
    pub fn cat(caches: Vec<KvCache<B>>) -> Self {
        let n = caches.first().map_or(0, |c| c.layers.len());
        let mut per_layer: Vec<Vec<(Tensor<B, 4>, Tensor<B, 4>)>> = vec![vec![]; n];
        for c in caches {
            assert_eq!(c.layers.len(), n, "caches of models with different layer counts");
            for (slot, layer) in c.layers.into_iter().zip(&mut per_layer) {
                layer.extend(slot);
            }
        }
        let layers = per_layer
            .into_iter()
            .map(|kv| {
                (!kv.is_empty()).then(|| {
                    let (k, v): (Vec<_>, Vec<_>) = kv.into_iter().unzip();
                    (Tensor::cat(k, 0), Tensor::cat(v, 0))
                })
            })
            .collect();
        Self { layers }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Host-side inputs of one forward call: ids, rotary positions and the attention bias.
///
/// Positions count real tokens only (`cumsum(mask) - 1`), so a left-padded row gets the same
/// positions, hence the same logits, as the unpadded sequence.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub batch: usize,
    /// New tokens in this call.
    pub len: usize,
    /// Cached tokens before this call.
    pub past: usize,
    /// `[batch * len]` token ids.
    pub ids: Vec<i64>,
    /// `[batch * len]` rotary position of each new token.
    pub positions: Vec<i64>,
    /// `[batch * (past + len)]` whether each key is a real token.
    pub key_mask: Vec<bool>,
    /// Packed rows (uncached forwards only): `[batch * len]` the example each token belongs
    /// to (0 = padding). A query sees only the keys of its own example.
    pub segments: Option<Vec<u32>>,
}

impl Inputs {
    /// A full (uncached) forward over `ids` `[batch, len]` with `mask` `[batch, len]`
    /// (true = real token; padding may be on either side).
    pub fn new(batch: usize, len: usize, ids: Vec<i64>, mask: Vec<bool>) -> Self {
        assert_eq!(ids.len(), batch * len, "ids must hold batch * len values");
        assert_eq!(mask.len(), batch * len, "mask must hold batch * len values");
        let mut positions = vec![0; batch * len];
        for b in 0..batch {
            let mut seen = 0i64;
            for t in 0..len {
                // padding gets the position of the nearest real token; it is masked anyway
                positions[b * len + t] = seen;
                if mask[b * len + t] {
                    seen += 1;
                }
            }
        }
        Self { batch, len, past: 0, ids, positions, key_mask: mask, segments: None }
    }

    /// A full forward over packed rows: `segments` `[batch, len]` numbers the examples of each
    /// row (1, 2, ...; 0 = padding). Each example gets its own positions from 0 and attends only
    /// to itself (block-diagonal causal attention), so its logits are those of the example
    /// alone, as transformers gives them for packed rows with `position_ids` restarting per
    /// example (`DataCollatorWithFlattening`).
    pub fn packed(batch: usize, len: usize, ids: Vec<i64>, segments: Vec<u32>) -> Self {
        assert_eq!(ids.len(), batch * len, "ids must hold batch * len values");
        assert_eq!(segments.len(), batch * len, "segments must hold batch * len values");
        let mut positions = vec![0; batch * len];
        for b in 0..batch {
            let (mut current, mut pos) = (0u32, 0i64);
            for t in 0..len {
                let s = segments[b * len + t];
                if s != current {
                    (current, pos) = (s, 0);
                }
                positions[b * len + t] = pos;
                pos += i64::from(s != 0);
            }
        }
        let key_mask = segments.iter().map(|&s| s != 0).collect();
        Self { batch, len, past: 0, ids, positions, key_mask, segments: Some(segments) }
    }

    /// Unpadded sequences of equal length.
    pub fn dense(batch: usize, len: usize, ids: Vec<i64>) -> Self {
        Self::new(batch, len, ids, vec![true; batch * len])
    }

    /// One decoding step after `past` cached positions: `ids` `[batch]`, `positions` `[batch]`,
    /// `key_mask` `[batch, past + 1]`.
    pub fn step(ids: Vec<i64>, positions: Vec<i64>, key_mask: Vec<bool>) -> Self {
        let batch = ids.len();
        let past = key_mask.len() / batch - 1;
        Self { batch, len: 1, past, ids, positions, key_mask, segments: None }
    }
}

impl<B: Backend> Qwen2<B> {
    /// A randomly initialised model (normal(0, `initializer_range`) weights, zero biases,
    /// unit norms), as transformers' `_init_weights` does.
    pub fn init(config: &Qwen2Config, device: &B::Device) -> Self {
        let std = config.initializer_range;
        let linear = |i: usize, o: usize, bias: bool| Linear {
            weight: Param::from_tensor(Tensor::random([i, o], Distribution::Normal(0.0, std), device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([o], device))),
        };
        let norm = |d: usize| RmsNorm {
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            epsilon: config.rms_norm_eps,
        };
        let (h, d) = (config.hidden_size, config.head_dim());
        let (q, kv) = (config.num_attention_heads * d, config.num_key_value_heads * d);
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(h),
                self_attn: Attention {
                    q_proj: linear(h, q, true),
                    k_proj: linear(h, kv, true),
                    v_proj: linear(h, kv, true),
                    o_proj: linear(q, h, false),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: d,
                },
                post_attention_layernorm: norm(h),
                mlp: Mlp {
                    gate_proj: linear(h, config.intermediate_size, false),
                    up_proj: linear(h, config.intermediate_size, false),
                    down_proj: linear(config.intermediate_size, h, false),
                },
            })
            .collect();
        Self {
            embed_tokens: Embedding {
                weight: Param::from_tensor(Tensor::random(
                    [config.vocab_size, h],
                    Distribution::Normal(0.0, std),
                    device,
                )),
            },
            layers,
            norm: norm(h),
            lm_head: (!config.tie_word_embeddings).then(|| linear(h, config.vocab_size, false)),
            rope_theta: config.rope_theta(),
            lora: None,
        }
        .with_stable_param_ids()
    }

    /// Numbers the parameters 0, 1, 2... in module order. Optimiser state is keyed by
    /// parameter id, so stable ids let a resumed run match its saved AdamW moments.
    pub fn with_stable_param_ids(self) -> Self {
        struct Renumber(u64);
        impl<B: Backend> ModuleMapper<B> for Renumber {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let (_, tensor, mapper) = param.consume();
                self.0 += 1;
                Param::from_mapped_value(ParamId::from(self.0 - 1), tensor, mapper)
            }
        }
        self.map(&mut Renumber(0))
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Float dtype of the weights (F32 or BF16); activations follow it.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.weight.val().dtype()
    }

    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.device()
    }
}

impl<B: FusedOps> Qwen2<B> {
    /// Logits of every new position, in the model's dtype.
    ///
    /// # Shapes
    /// - returns `[batch, len, vocab_size]`
    pub fn forward(&self, inputs: &Inputs, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.lm_head(self.forward_hidden(inputs, cache))
    }

    /// Final hidden states (after the last RMSNorm), `[batch, len, hidden_size]`.
    pub fn forward_hidden(&self, inputs: &Inputs, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let device = self.device();
        let dtype = self.dtype();
        let (b, t) = (inputs.batch, inputs.len);
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        assert_eq!(past, inputs.past, "inputs were built for {} cached positions, the cache has {past}", inputs.past);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs.ids.clone(), [b, t]), &device);
        let rope = self.rope_tables(inputs, &device, dtype);
        let bias = attention_bias::<B>(inputs, &device, dtype);

        let mut x = self.embed_tokens.forward(ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &rope, bias.clone(), layer_cache, self.layer_lora(i));
        }
        rms_norm(&self.norm, x)
    }

    /// The token embeddings, `[batch, len, hidden]`: the first stage of a forward pass without a
    /// cache. [`Qwen2::embed`] → [`Qwen2::layer`] for each layer → [`Qwen2::head`] is
    /// [`Qwen2::forward`], in stages that activation checkpointing can recompute one at a time.
    pub fn embed(&self, inputs: &Inputs) -> Tensor<B, 3> {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs.ids.clone(), [inputs.batch, inputs.len]), &self.device());
        self.embed_tokens.forward(ids)
    }

    /// What every layer of one forward pass shares: the rotary tables and the attention bias.
    pub fn layer_inputs(&self, inputs: &Inputs) -> LayerInputs<B> {
        let (device, dtype) = (self.device(), self.dtype());
        LayerInputs { rope: self.rope_tables(inputs, &device, dtype), bias: attention_bias::<B>(inputs, &device, dtype) }
    }

    /// Decoder layer `i` on hidden states `x` `[batch, len, hidden]` (no cache).
    pub fn layer(&self, i: usize, x: Tensor<B, 3>, shared: &LayerInputs<B>) -> Tensor<B, 3> {
        self.layers[i].forward(x, &shared.rope, shared.bias.clone(), None, self.layer_lora(i))
    }

    /// The adapters of layer `i`, if the model has any.
    fn layer_lora(&self, i: usize) -> Option<&LayerLora<B>> {
        self.lora.as_ref().map(|l| &l.layers[i])
    }

    /// The final RMSNorm and the head: last hidden states → logits `[batch, len, vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lm_head(rms_norm(&self.norm, x))
    }

    /// `[batch, len, hidden]` → `[batch, len, vocab]` through `lm_head` or the tied embedding.
    pub fn lm_head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => project(head, None, hidden),
            None => {
                let [b, t, h] = hidden.dims();
                let (rows, embed) = (hidden.reshape([b * t, h]), self.embed_tokens.weight.val());
                // With few rows (decoding) `rows × embedᵀ` hits gemm's slow path for a transposed
                // right operand (23 against 195 GFLOP/s on AVX-512 for 16 rows); `(embed × rowsᵀ)ᵀ`
                // reads the embedding row by row instead. Same products, other summation order.
                let logits = if b * t < 512 { embed.matmul(rows.transpose()).transpose() } else { rows.matmul(embed.transpose()) };
                logits.reshape([b, t, self.vocab_size()])
            }
        }
    }

    /// cos and sin of the rotary angles, computed in f32 the way transformers does
    /// (`inv_freq = 1 / theta^(2i/d)`, angles = position * inv_freq), laid out like the
    /// projected heads before they are transposed, `[batch, len, heads, head_dim]`, once for the
    /// query heads and once for the kv heads: the products in [`FusedOps::rope_heads`] are then
    /// between contiguous tensors of one shape.
    fn rope_tables(&self, inputs: &Inputs, device: &B::Device, dtype: DType) -> Rope<B> {
        let d = self.layers.first().map(|l| l.self_attn.head_dim).unwrap_or(2);
        let (cos, sin) = rope_angles(&inputs.positions, self.rope_theta as f32, d);
        let shape = [inputs.batch, inputs.len, 1, d];
        let table = |v: Vec<f32>, scale: f64, heads: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, shape), (device, DType::F32)).mul_scalar(scale).cast(dtype).repeat_dim(2, heads)
        };
        let (h, kvh) = self.layers.first().map(|l| (l.self_attn.num_heads, l.self_attn.num_kv_heads)).unwrap_or((1, 1));
        // the attention scale 1/√d rides on the query's tables (the rotation is linear): one
        // multiply fewer over the [batch, heads, len, len] scores, forward and backward
        let scale = 1.0 / (d as f64).sqrt();
        Rope { q: (table(cos.clone(), scale, h), table(sin.clone(), scale, h)), k: (table(cos, 1.0, kvh), table(sin, 1.0, kvh)) }
    }
}

/// cos and sin of the rotary angles of `positions`, `[positions.len()][head_dim]` (each
/// frequency twice, HF's rotate-half layout), in f32 as transformers computes them.
pub fn rope_angles(positions: &[i64], theta: f32, d: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
    let n = positions.len() * d;
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for &p in positions {
        for _half in 0..2 {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// The rotary tables and attention bias one forward pass shares between its layers
/// ([`Qwen2::layer_inputs`]).
pub struct LayerInputs<B: Backend> {
    rope: Rope<B>,
    bias: Tensor<B, 4>,
}

/// Rotary tables (cos, sin) of one forward call, `[batch, len, heads, head_dim]`, for the query
/// heads (times the attention scale 1/√head_dim) and for the kv heads.
struct Rope<B: Backend> {
    q: (Tensor<B, 4>, Tensor<B, 4>),
    k: (Tensor<B, 4>, Tensor<B, 4>),
}

/// Additive attention bias `[batch, 1, len, past + len]`: 0 where query i may attend key j
/// (causal, j ≤ past + i, j is a real token, and in a packed row j is of i's example),
/// [`MASKED`] elsewhere.
fn attention_bias<B: Backend>(inputs: &Inputs, device: &B::Device, dtype: DType) -> Tensor<B, 4> {
    let (b, t, past) = (inputs.batch, inputs.len, inputs.past);
    assert!(inputs.segments.is_none() || past == 0, "packed rows (segments) are for uncached forwards only");
    let s = past + t;
    let mut bias = vec![MASKED; b * t * s];
    for row in 0..b {
        for i in 0..t {
            for j in 0..=past + i {
                let same_example = inputs.segments.as_ref().is_none_or(|seg| seg[row * t + i] == seg[row * s + j]);
                if inputs.key_mask[row * s + j] && same_example {
                    bias[(row * t + i) * s + j] = 0.0;
                }
            }
        }
    }
    Tensor::<B, 4>::from_data(TensorData::new(bias, [b, 1, t, s]), (device, DType::F32)).cast(dtype)
}

impl<B: FusedOps> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        lora: Option<&LayerLora<B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(rms_norm(&self.input_layernorm, x), rope, bias, cache, lora);
        h.clone() + self.mlp.forward(rms_norm(&self.post_attention_layernorm, h), lora)
    }
}

impl<B: FusedOps> Mlp<B> {
    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: Tensor<B, 3>, lora: Option<&LayerLora<B>>) -> Tensor<B, 3> {
        let gate = project(&self.gate_proj, lora.and_then(|l| l.gate_proj.as_ref()), x.clone());
        let up = project(&self.up_proj, lora.and_then(|l| l.up_proj.as_ref()), x);
        project(&self.down_proj, lora.and_then(|l| l.down_proj.as_ref()), B::swiglu(gate, up))
    }
}

impl<B: FusedOps> Attention<B> {
    /// Grouped-query attention with rotate-half rotary embeddings.
    ///
    /// # Shapes
    /// - x: `[batch, len, hidden]`, bias: `[batch, 1, len, past + len]` (shared by the heads)
    /// - returns `[batch, len, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        lora: Option<&LayerLora<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // rotate while each projection is still `[b, t, heads, d]` (contiguous), out as `[b, heads, t, d]`
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, d]);
        let adapter = |pick: fn(&LayerLora<B>) -> Option<&LoraPair<B>>| lora.and_then(pick);
        let q = B::rope_heads(heads(project(&self.q_proj, adapter(|l| l.q_proj.as_ref()), x.clone()), h), rope.q.0.clone(), rope.q.1.clone());
        let mut k = B::rope_heads(heads(project(&self.k_proj, adapter(|l| l.k_proj.as_ref()), x.clone()), kvh), rope.k.0.clone(), rope.k.1.clone());
        let mut v = heads(project(&self.v_proj, adapter(|l| l.v_proj.as_ref()), x), kvh).swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention without copying K/V: the `rep` query heads that share a kv
        // head (HF's repeat_kv order: query head i uses kv head i / rep) are stacked along the
        // position axis, [b, h, t, d] → [b, kv_heads, rep * t, d].
        let (rep, s) = (h / kvh, k.dims()[2]);
        let q = q.reshape([b, kvh, rep * t, d]);
        let scores = q.matmul(k.swap_dims(2, 3)); // [b, kvh, rep*t, s], scaled by 1/√d through the query's rotary tables
        let probs = B::masked_softmax(scores.reshape([b, h, t, s]), bias);
        let attn = probs.reshape([b, kvh, rep * t, s]).matmul(v).reshape([b, h, t, d]);
        project(&self.o_proj, adapter(|l| l.o_proj.as_ref()), attn.swap_dims(1, 2).reshape([b, t, h * d]))
    }
}

/// `norm.forward(x)` through the backend's fused RMSNorm.
fn rms_norm<B: FusedOps>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    B::rms_norm(x, norm.gamma.val(), norm.epsilon)
}

/// `linear(x)`, plus the LoRA adapter's addition when there is one, for `x` `[batch, len, in]`
/// as one `[batch * len, in] × [in, out]` matmul: burn's `Linear` on a 3-d input runs one
/// matmul per batch row (a matrix-vector product per sequence when decoding), reading the
/// weights `batch` times.
fn project<B: Backend>(linear: &Linear<B>, lora: Option<&LoraPair<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, n] = x.dims();
    let x = x.reshape([b * t, n]);
    let y = match lora {
        Some(adapter) => adapter.add_to(linear.forward(x.clone()), x),
        None => linear.forward(x),
    };
    let out = y.dims()[1];
    y.reshape([b, t, out])
}
