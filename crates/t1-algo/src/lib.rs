//! The T1 recipe (arXiv 2501.11651) as pure functions over tensors, one module a reader can take
//! in at once. Shapes are in the doc comments: `B` sequences, `T` positions, `V` vocabulary.
//!
//! - [`token_logprobs`], [`token_entropy`]: from logits.
//! - [`advantages`]: RLOO (T1's leave-one-out baseline), GRPO (group mean/std), none.
//! - [`kl`]: the k1/k2/k3 estimators of KL(π‖π_ref) per token; [`center_leave_one_out`] for
//!   T1's on-policy KL normalisation.
//! - [`policy_loss`]: importance ratio with PPO clipping (separate ε_low / ε_high).
//! - [`aggregate`]: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm, with a batch-level
//!   [`Normalizer`] so that summing shard losses equals the whole-batch loss.
//! - [`ema_update`]: T1's dynamic anchor θ_ref ← β·θ_ref + (1−β)·θ.
//!
//! **Architecture invariant:** no I/O, no concrete backend; every function is generic over
//! `B: Backend` (`FusedOps` where it takes a log-softmax) and documents its shapes.

use burn::tensor::backend::Backend;
use t1_model::FusedOps;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Log-probability of each target token.
///
/// # Shapes
/// - logits `[B, T, V]`, targets `[B, T]` → `[B, T]`
pub fn token_logprobs<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let logp = B::log_softmax_last(logits);
    logp.gather(2, targets.unsqueeze_dim(2)).squeeze_dim(2)
}

/// Entropy of the next-token distribution, −Σ_v p_v log p_v, at every position.
///
/// # Shapes
/// - logits `[B, T, V]` → `[B, T]`
pub fn token_entropy<B: FusedOps>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let logp = B::log_softmax_last(logits);
    logp.clone().exp().mul(logp).sum_dim(2).squeeze_dim(2).neg()
}

/// Baseline subtracted from the rewards of the K samples of one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// Leave-one-out (RLOO, T1's): A_i = r_i − mean_{j≠i} r_j.
    Rloo,
    /// Group normalisation (GRPO): A_i = (r_i − mean r) / (std r + 1e-6).
    Grpo,
    /// A_i = r_i (plain REINFORCE).
    None,
}

/// Advantages of `rewards`, laid out as consecutive groups of `group_size` samples per prompt.
///
/// # Shapes
/// - rewards `[G * K]` → `[G * K]`
pub fn advantages(rewards: &[f32], group_size: usize, baseline: Baseline) -> Vec<f32> {
    assert!(group_size > 0 && rewards.len() % group_size == 0, "rewards must hold whole groups");
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let k = group.len() as f32;
        let mean = group.iter().sum::<f32>() / k;
        match baseline {
            Baseline::Rloo => out.extend(center_leave_one_out(group)),
            Baseline::Grpo => {
                // unbiased std, as torch.std in GRPO implementations; 0 for K = 1
                let var = if group.len() > 1 {
                    group.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / (k - 1.0)
                } else {
                    0.0
                };
                out.extend(group.iter().map(|r| (r - mean) / (var.sqrt() + 1e-6)));
            }
            Baseline::None => out.extend_from_slice(group),
        }
    }
    out
}

/// Leave-one-out centring of one group: x_i − mean_{j≠i} x_j (0 for a group of one).
/// Used for RLOO advantages and for T1's on-policy KL normalisation.
pub fn center_leave_one_out(group: &[f32]) -> Vec<f32> {
    let k = group.len();
    if k < 2 {
        return vec![0.0; k];
    }
    let sum: f32 = group.iter().sum();
    group.iter().map(|x| x - (sum - x) / (k - 1) as f32).collect()
}

/// Estimator of KL(π‖π_ref) from samples of π (Schulman, "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// log π − log π_ref: unbiased, can be negative.
    K1,
    /// ½ (log π − log π_ref)²: biased, ≥ 0, low variance.
    K2,
    /// (π_ref/π) − 1 − log(π_ref/π): unbiased, ≥ 0.
    K3,
}

/// Per-token KL estimate.
///
/// # Shapes
/// - logp, ref_logp `[B, T]` → `[B, T]`
pub fn kl<B: Backend>(logp: Tensor<B, 2>, ref_logp: Tensor<B, 2>, estimator: KlEstimator) -> Tensor<B, 2> {
    let log_ratio = logp - ref_logp; // log π/π_ref
    match estimator {
        KlEstimator::K1 => log_ratio,
        KlEstimator::K2 => log_ratio.powf_scalar(2.0).mul_scalar(0.5),
        KlEstimator::K3 => {
            let r = log_ratio.neg(); // log π_ref/π
            r.clone().exp() - r - 1.0
        }
    }
}

/// PPO-clipped policy-gradient loss per token, and whether the clip was active.
///
/// loss = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) with ρ = exp(logp − old_logp). With one
/// optimisation epoch on fresh samples ρ = 1 and this is REINFORCE with baseline (T1's).
///
/// # Shapes
/// - logp, old_logp `[B, T]`, advantages `[B]` (one per sequence) → (`[B, T]`, `[B, T]` 0/1)
pub fn policy_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    advantages: Tensor<B, 1>,
    eps_low: f32,
    eps_high: f32,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let ratio = (logp - old_logp).exp();
    let adv = advantages.unsqueeze_dim::<2>(1); // [B, 1]
    let unclipped = ratio.clone() * adv.clone();
    let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv;
    let clip_active = clipped.clone().lower(unclipped.clone()).float();
    (unclipped.min_pair(clipped).neg(), clip_active)
}

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggMode {
    /// Σ_tokens loss / number of tokens in the batch.
    TokenMean,
    /// mean over sequences of each sequence's token mean.
    SeqMeanTokenMean,
    /// mean over sequences of (token sum / a constant length), as in Dr. GRPO.
    SeqMeanTokenSumNorm,
}

/// Batch-level constants of [`aggregate`]: computing them over the whole batch and passing them
/// to every shard makes the sum of shard losses equal the whole-batch loss in every mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    /// Tokens with mask 1 in the whole batch.
    pub tokens: f32,
    /// Sequences in the whole batch.
    pub sequences: f32,
    /// The constant length of `SeqMeanTokenSumNorm` (e.g. the max response length).
    pub norm_len: f32,
}

impl Normalizer {
    /// From the whole batch's mask `[B, T]` (row-major host values).
    pub fn of_mask(mask: &[f32], seq_len: usize, norm_len: f32) -> Self {
        let tokens = mask.iter().sum::<f32>().max(1.0);
        Self { tokens, sequences: (mask.len() / seq_len.max(1)) as f32, norm_len }
    }
}

/// Reduces a per-token loss over the positions where `mask` is 1.
///
/// # Shapes
/// - loss, mask `[B, T]` → `[1]`
pub fn aggregate<B: Backend>(loss: Tensor<B, 2>, mask: Tensor<B, 2>, mode: AggMode, norm: Normalizer) -> Tensor<B, 1> {
    let masked = loss * mask.clone();
    match mode {
        AggMode::TokenMean => masked.sum().div_scalar(norm.tokens),
        AggMode::SeqMeanTokenMean => {
            let per_seq = masked.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0); // [B, 1]
            per_seq.sum().div_scalar(norm.sequences)
        }
        AggMode::SeqMeanTokenSumNorm => masked.sum().div_scalar(norm.norm_len * norm.sequences),
    }
}

/// Masked mean, e.g. the SFT loss over assistant tokens: Σ x·mask / Σ mask.
///
/// # Shapes
/// - x, mask `[B, T]` → `[1]`
pub fn masked_mean<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    (x * mask.clone()).sum() / mask.sum().clamp_min(1.0)
}

/// How the KL anchor (reference model) follows the policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Anchor {
    /// The reference stays the initial (SFT) model.
    Frozen,
    /// T1's dynamic anchor: every `every` steps θ_ref ← β·θ_ref + (1−β)·θ.
    Ema { beta: f32, every: usize },
    /// Every `every` steps θ_ref ← θ.
    Reset { every: usize },
}

/// θ_ref ← β·θ_ref + (1−β)·θ for every float parameter. Both modules must have the same
/// structure (the reference is a copy of the policy).
pub fn ema_update<B: Backend, M: Module<B>>(reference: M, policy: &M, beta: f32) -> M {
    struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().reshape([-1]));
        }
    }
    struct Blend<B: Backend> {
        policy: std::vec::IntoIter<Tensor<B, 1>>,
        beta: f32,
    }
    impl<B: Backend> ModuleMapper<B> for Blend<B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let theta = self.policy.next().expect("same structure").reshape(tensor.dims());
            let blended = tensor.mul_scalar(self.beta) + theta.mul_scalar(1.0 - self.beta);
            Param::from_mapped_value(id, blended, mapper)
        }
    }
    let mut collect = Collect(Vec::new());
    policy.visit(&mut collect);
    reference.map(&mut Blend { policy: collect.0.into_iter(), beta })
}

#[cfg(test)]
mod tests;
