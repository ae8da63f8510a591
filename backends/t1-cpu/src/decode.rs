//! A decoding step on the host: one new token per sequence through the whole model, on plain
//! `f32` slices, with the keys and values of earlier tokens kept in host buffers that grow by
//! doubling.
//!
//! The same arithmetic as [`Qwen2::forward`] (RMSNorm → q/k/v with bias → rotate-half
//! RoPE → grouped-query attention → o_proj → residual → RMSNorm → SwiGLU → residual, final
//! RMSNorm, lm_head), for `len = 1`, with the projections through the packed kernel
//! (`packed.rs`) and the work split between the threads of a [`Team`]. Done on the host
//! because a decoding step is small: through burn tensors each step re-copied the whole KV
//! cache (`Tensor::cat`; burn-flex's `slice_assign` copies the tensor too), so the cost per
//! token grew with the sequence, and each of a dozen small tensor ops per layer allocated and
//! passed over its data. Used only where [`HostEngine::new`] gives an engine (burn-flex, f32
//! or bf16, AVX-512); tested against the full forward pass.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use t1_model::{rope_angles, Decoder, Inputs, KvCache, Qwen2, MASKED};
use t1_ops::kernels::{self, available, exp_in_place, rms_norm_into, swiglu_into};
use t1_ops::FusedOps;

use crate::packed::{host, PackedLayer, PackedLinear};
use crate::team::Team;

/// A model's weights copied to the host for decoding on the CPU: the projections packed for
/// the few-row kernel (`packed.rs`), the rest as plain vectors. Shared by the threads decoding
/// one batch, and valid while the model's weights do not change.
#[derive(Debug, Clone)]
pub struct HostEngine(Arc<HostModel>);

impl HostEngine {
    /// The engine for `model` when its backend keeps tensors in host memory
    /// ([`FusedOps::HOST_MEMORY`]: burn-flex), in f32 or bf16, on a CPU with AVX-512;
    /// `None` elsewhere (GPU backends, f16, other CPUs), where decoding goes through burn
    /// ([`t1_model::BurnDecoder`]). bf16 projection weights stay bf16 (half the bytes to
    /// read); activations are f32.
    pub fn new<B: FusedOps>(model: &Qwen2<B>) -> Option<Self> {
        let bf16 = match model.dtype() {
            DType::F32 => false,
            DType::BF16 => true,
            _ => return None,
        };
        if !B::HOST_MEMORY || !available() {
            return None;
        }
        // LoRA adapters are merged into the packed copy (W + s·A B, rounded once to the
        // weights' dtype), so decoding costs what the base costs
        let merged;
        let model = if model.lora.is_some() {
            merged = model.clone().merge_lora();
            &merged
        } else {
            model
        };
        let first = &model.layers.first()?.self_attn;
        let (hidden, vocab) = (model.embed_tokens.weight.dims()[1], model.vocab_size());
        let embed = host(model.embed_tokens.weight.val());
        let head = match &model.lm_head {
            Some(head) => PackedLinear::from_linear(head, bf16),
            None => {
                let mut transposed = vec![0.0; embed.len()];
                for (v, row) in embed.chunks_exact(hidden).enumerate() {
                    for (h, x) in row.iter().enumerate() {
                        transposed[h * vocab + v] = *x;
                    }
                }
                PackedLinear::new(&transposed, hidden, vocab, None, bf16)
            }
        };
        let layers = model
            .layers
            .iter()
            .map(|l| HostLayer {
                input_norm: host(l.input_layernorm.gamma.val()),
                post_norm: host(l.post_attention_layernorm.gamma.val()),
                proj: PackedLayer {
                    qkv: PackedLinear::concat(&[&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj], bf16),
                    o: PackedLinear::from_linear(&l.self_attn.o_proj, bf16),
                    gate_up: PackedLinear::concat(&[&l.mlp.gate_proj, &l.mlp.up_proj], bf16),
                    down: PackedLinear::from_linear(&l.mlp.down_proj, bf16),
                },
            })
            .collect();
        Some(HostEngine(Arc::new(HostModel {
            layers,
            embed,
            norm: host(model.norm.gamma.val()),
            eps: model.norm.epsilon as f32,
            head,
            hidden,
            heads: first.num_heads,
            kv_heads: first.num_kv_heads,
            head_dim: first.head_dim,
            rope_theta: model.rope_theta as f32,
            dtype: model.dtype(),
        })))
    }

    /// A decoder that continues from `cache` (a prefill of `batch` sequences through burn,
    /// moved to host buffers) and splits each step between `threads` threads: this one and
    /// `threads - 1` helpers that spin while the decoder lives, so drop it when decoding is
    /// done.
    pub fn decoder<B: Backend>(&self, cache: KvCache<B>, batch: usize, threads: usize) -> HostDecoder {
        let m = &self.0;
        let mut layers = cache.into_layers();
        let kv = HostKv::from_tensors(&mut layers, batch, m.kv_heads, m.head_dim, m.dtype);
        HostDecoder { model: self.0.clone(), kv, team: Team::new(threads.max(1)) }
    }
}

/// Decoding steps on the host ([`HostEngine::decoder`]).
#[derive(Debug)]
pub struct HostDecoder {
    model: Arc<HostModel>,
    kv: HostKv,
    team: Team,
}

impl Decoder for HostDecoder {
    fn step(&mut self, inputs: &Inputs) -> Vec<f32> {
        self.model.step(inputs, &mut self.kv, &self.team)
    }

    fn len(&self) -> usize {
        self.kv.len
    }
}

impl HostDecoder {
    /// The keys and values back in burn tensors of the model's dtype, for calls through
    /// [`Qwen2::forward`] (several tokens at once).
    pub fn into_cache<B: Backend>(self, device: &B::Device) -> KvCache<B> {
        KvCache::from_layers(self.kv.into_tensors(device))
    }
}

/// What a host decoding step reads, copied from a model on burn-flex.
#[derive(Debug)]
pub(crate) struct HostModel {
    pub(crate) layers: Vec<HostLayer>,
    /// `[vocab, hidden]`
    pub(crate) embed: Vec<f32>,
    pub(crate) norm: Vec<f32>,
    pub(crate) eps: f32,
    /// `lm_head`, or the tied embedding transposed.
    pub(crate) head: PackedLinear,
    pub(crate) hidden: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) rope_theta: f32,
    /// The model's dtype, which the keys and values get back in [`HostDecoder::into_cache`].
    pub(crate) dtype: DType,
}

#[derive(Debug)]
pub(crate) struct HostLayer {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) proj: PackedLayer,
}

/// Positions per block of the keys' layout.
const BLOCK: usize = 16;

/// Keys and values of the tokens seen so far, per layer. Values `[batch][kv_heads][capacity]
/// [head_dim]`; keys in blocks of [`BLOCK`] positions, `[batch][kv_heads][capacity / BLOCK]
/// [head_dim][BLOCK]`, so that the scores of a block of positions are [`BLOCK`] lanes of
/// multiply-adds (no horizontal sums). The capacity is a multiple of [`BLOCK`].
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    pub(crate) len: usize,
    cap: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// The model's dtype, which the keys and values get back in [`Self::into_tensors`].
    dtype: DType,
}

/// Offset of element `i` of position `p` in one sequence's and kv head's blocked keys.
#[inline(always)]
fn key_at(p: usize, i: usize, d: usize) -> usize {
    (p / BLOCK) * d * BLOCK + i * BLOCK + p % BLOCK
}

impl HostKv {
    /// Moves the cache's tensors `[batch, kv_heads, len, head_dim]` (all `None` for an empty
    /// cache) to host buffers.
    pub(crate) fn from_tensors<B: Backend>(
        slots: &mut [Option<(Tensor<B, 4>, Tensor<B, 4>)>],
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Self {
        let len = slots.first().and_then(|s| s.as_ref()).map_or(0, |(k, _)| k.dims()[2]);
        let empty = || (vec![], vec![]);
        let mut kv = Self { batch, kv_heads, head_dim, len: 0, cap: 0, layers: slots.iter().map(|_| empty()).collect(), dtype };
        kv.reserve(len + 1);
        for (layer, slot) in slots.iter_mut().enumerate() {
            if let Some((k, v)) = slot.take() {
                assert_eq!(k.dims(), [batch, kv_heads, len, head_dim], "KV cache of another shape");
                let (k, v, d) = (host(k), host(v), head_dim);
                let (keys, values) = &mut kv.layers[layer];
                for r in 0..batch * kv_heads {
                    for p in 0..len {
                        let at = (r * len + p) * d;
                        for i in 0..d {
                            keys[r * kv.cap * d + key_at(p, i, d)] = k[at + i];
                        }
                        values[(r * kv.cap + p) * d..][..d].copy_from_slice(&v[at..at + d]);
                    }
                }
            }
        }
        kv.len = len;
        kv
    }

    /// Back to tensors, for a forward call that is not a host decoding step.
    pub(crate) fn into_tensors<B: Backend>(self, device: &B::Device) -> Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>> {
        let shape = [self.batch, self.kv_heads, self.len, self.head_dim];
        let (len, cap, d, rows) = (self.len, self.cap, self.head_dim, self.batch * self.kv_heads);
        let tensor = |data: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(data, shape), (device, DType::F32)).cast(self.dtype);
        let keys = |buf: &[f32]| (0..rows).flat_map(|r| (0..len).flat_map(move |p| (0..d).map(move |i| buf[r * cap * d + key_at(p, i, d)]))).collect();
        let values = |buf: &[f32]| buf.chunks_exact(cap * d).flat_map(|c| c[..len * d].iter().copied()).collect();
        self.layers.iter().map(|(k, v)| (len > 0).then(|| (tensor(keys(k)), tensor(values(v))))).collect()
    }

    /// Room for `positions` positions, doubling the capacity: copies stay amortised O(1) per token.
    fn reserve(&mut self, positions: usize) {
        if positions <= self.cap {
            return;
        }
        let cap = positions.max(2 * self.cap).max(64).next_multiple_of(BLOCK);
        let (old, d, rows) = (self.cap, self.head_dim, self.batch * self.kv_heads);
        // the keys' last block may be partly filled
        let (key_len, len) = (self.len.next_multiple_of(BLOCK), self.len);
        let regrow = |buf: &mut Vec<f32>, len: usize| {
            let mut grown = vec![0.0; rows * cap * d];
            if old > 0 {
                for r in 0..rows {
                    grown[r * cap * d..][..len * d].copy_from_slice(&buf[r * old * d..][..len * d]);
                }
            }
            *buf = grown;
        };
        for (k, v) in &mut self.layers {
            regrow(k, key_len);
            regrow(v, len);
        }
        self.cap = cap;
    }

    /// Writes position `self.len` of `layer` from `k` and `v` `[batch, kv_heads * head_dim]`.
    fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (d, cap, pos) = (self.head_dim, self.cap, self.len);
        let (keys, values) = &mut self.layers[layer];
        for (r, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            for (i, x) in kr.iter().enumerate() {
                keys[r * cap * d + key_at(pos, i, d)] = *x;
            }
            values[(r * cap + pos) * d..][..d].copy_from_slice(vr);
        }
    }
}

impl HostModel {
    /// Logits `[batch, vocab]` of one new token per sequence; appends its keys and values to `kv`.
    /// The products and attention are split between the threads of `team`.
    pub(crate) fn step(&self, inputs: &Inputs, kv: &mut HostKv, team: &Team) -> Vec<f32> {
        let (b, hid, d) = (inputs.batch, self.hidden, self.head_dim);
        let (nq, nkv) = (self.heads * d, self.kv_heads * d);
        assert!(inputs.len == 1 && inputs.past == kv.len && kv.batch == b, "not a decoding step for this cache");
        let s = kv.len + 1;
        kv.reserve(s);
        let mut x: Vec<f32> = inputs.ids.iter().flat_map(|&id| self.embed[id as usize * hid..][..hid].iter().copied()).collect();
        let (cos, sin) = rope_angles(&inputs.positions, self.rope_theta, d);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        for (l, layer) in self.layers.iter().enumerate() {
            let p = &layer.proj;
            let xn = rms_norm(&x, &layer.input_norm, self.eps);
            let qkv = p.qkv.apply_split(&xn, b, team);
            let column = |from: usize, width: usize| -> Vec<f32> {
                qkv.chunks_exact(nq + 2 * nkv).flat_map(|row| row[from..from + width].iter().copied()).collect()
            };
            let (mut q, mut k, v) = (column(0, nq), column(nq, nkv), column(nq + nkv, nkv));
            rotate(&mut q, &cos, &sin, d, scale);
            rotate(&mut k, &cos, &sin, d, 1.0);
            kv.write(l, &k, &v);
            let kv = &*kv;
            let attn = split_rows(team, b, nq, |rows, out| self.attend(l, &q, kv, &inputs.key_mask, s, rows, out));
            add(&mut x, &p.o.apply_split(&attn, b, team));
            let xn = rms_norm(&x, &layer.post_norm, self.eps);
            let gate_up = p.gate_up.apply_split(&xn, b, team);
            let inter = gate_up.len() / b / 2;
            let act = split_rows(team, b, inter, |rows, out| {
                let gate_up = &gate_up[rows.start * 2 * inter..rows.end * 2 * inter];
                for (row, act) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
                    let (gate, up) = row.split_at(inter);
                    swiglu_into(gate, up, act);
                }
            });
            add(&mut x, &p.down.apply_split(&act, b, team));
        }
        kv.len = s;
        self.head.apply_split(&rms_norm(&x, &self.norm, self.eps), b, team)
    }

    /// Attention of the (scaled, rotated) queries `q` `[batch, heads * head_dim]` over the `s`
    /// cached positions of `layer`; `key_mask` `[batch, s]`. Masked keys get weight 0, which is
    /// what their [`MASKED`] bias gives in the full forward pass; a row without any real key
    /// gets uniform weights, as there.
    /// Only the sequences `rows`, into `out` `[rows.len(), heads * head_dim]` (zeros).
    #[allow(clippy::too_many_arguments)]
    fn attend(&self, layer: usize, q: &[f32], kv: &HostKv, key_mask: &[bool], s: usize, rows: Range<usize>, out: &mut [f32]) {
        let (d, cap, rep, width) = (self.head_dim, kv.cap, self.heads / self.kv_heads, self.heads * self.head_dim);
        let (keys, values) = &kv.layers[layer];
        let mut weights = vec![0.0f32; rep * s];
        for (i, row) in rows.enumerate() {
            let mask = &key_mask[row * s..][..s];
            for g in 0..self.kv_heads {
                let at = (row * self.kv_heads + g) * cap * d;
                let heads = g * rep * d..(g + 1) * rep * d;
                let (qg, og) = (&q[row * width..][heads.clone()], &mut out[i * width..][heads]);
                // SAFETY: `HostEngine::new` gives an engine only on a CPU with AVX-512.
                unsafe { attend_group(qg, &keys[at..at + s.next_multiple_of(BLOCK) * d], &values[at..at + s * d], mask, &mut weights, og) };
            }
        }
    }
}

/// The query heads `q` `[rep][d]` that share one kv head over its blocked keys (`[s / BLOCK]
/// [d][BLOCK]`, the last block partly used) and its values `[s][d]`, into `out` `[rep][d]`
/// (zero on entry). Each key and value is read once for the `rep` heads; compiled for AVX-512
/// so that LLVM vectorises the blocks of scores and the weighted sums.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn attend_group(q: &[f32], keys: &[f32], values: &[f32], mask: &[bool], weights: &mut [f32], out: &mut [f32]) {
    let (s, rep) = (mask.len(), weights.len() / mask.len());
    let d = q.len() / rep;
    let uniform = !mask.contains(&true);
    // weights[h * s + j]: scores, then exp(score - max)
    for (block, keys) in keys.chunks_exact(d * BLOCK).enumerate() {
        let first = block * BLOCK;
        let used = BLOCK.min(s - first);
        for (h, qh) in q.chunks_exact(d).enumerate() {
            let mut acc = [0.0f32; BLOCK];
            for (&qi, k) in qh.iter().zip(keys.chunks_exact(BLOCK)) {
                for l in 0..BLOCK {
                    acc[l] += qi * k[l];
                }
            }
            for (l, score) in acc[..used].iter().enumerate() {
                let j = first + l;
                weights[h * s + j] = if uniform { score + MASKED } else if mask[j] { *score } else { f32::NEG_INFINITY };
            }
        }
    }
    for w in weights.chunks_exact_mut(s) {
        let max = kernels::max(w);
        w.iter_mut().for_each(|x| *x -= max);
        exp_in_place(w);
        let inv = 1.0 / kernels::sum(w);
        w.iter_mut().for_each(|x| *x *= inv);
    }
    for (j, v) in values.chunks_exact(d).enumerate() {
        for (h, oh) in out.chunks_exact_mut(d).enumerate() {
            let p = weights[h * s + j];
            if p != 0.0 {
                for (o, x) in oh.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    }
}

/// `[n, width]` zeros, filled by `f(rows, out)` for the rows `0..n` split between the threads
/// of `team` (`out` the rows' part).
fn split_rows(team: &Team, n: usize, width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; n * width];
    let parts = team.parts().min(n).max(1);
    if parts == 1 {
        f(0..n, &mut out);
        return out;
    }
    let bounds: Vec<usize> = (0..=parts).map(|p| p * n / parts).collect();
    let mut rest = out.as_mut_slice();
    let mut chunks = Vec::with_capacity(parts);
    for w in bounds.windows(2) {
        let (mine, tail) = rest.split_at_mut((w[1] - w[0]) * width);
        chunks.push(Mutex::new(mine));
        rest = tail;
    }
    team.run(&|p| {
        if p < parts {
            f(bounds[p]..bounds[p + 1], &mut chunks[p].lock().unwrap_or_else(|e| e.into_inner()));
        }
    });
    drop(chunks);
    out
}

/// RMSNorm over rows of `gamma.len()`, as the burn forward pass computes it.
fn rms_norm(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    rms_norm_into(x, gamma, eps, &mut y);
    y
}

/// Rotate-half RoPE in place on rows `[heads * d]` (one row per sequence, angles per row),
/// times `scale`: `x * cos + rotate_half(x) * sin`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize, scale: f32) {
    let rows = cos.len() / d;
    let per_row = x.len() / rows;
    let half = d / 2;
    for (r, row) in x.chunks_exact_mut(per_row).enumerate() {
        let (c, s) = (&cos[r * d..][..d], &sin[r * d..][..d]);
        for h in row.chunks_exact_mut(d) {
            let (x1, x2) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * (c[i] * scale) + -b * (s[i] * scale);
                x2[i] = b * (c[half + i] * scale) + a * (s[half + i] * scale);
            }
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
