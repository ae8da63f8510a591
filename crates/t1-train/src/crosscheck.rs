//! Cross-backend agreement: the same model, batch and RL data on two backends must give the
//! same logits, log-probs, losses, gradients and AdamW step, within [`tolerance`].
//!
//! A [`Case`] is host data (HF-named weights, token ids with padding, RL tensors); [`compute`]
//! evaluates every quantity on one backend and returns host vectors; [`compare`] makes the table.

use t1_model::{FusedAutodiff, FusedOps};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use t1_algo::{aggregate, kl, masked_mean, policy_loss, token_entropy, token_logprobs, AggMode, KlEstimator, Normalizer};
use t1_model::{hf, Inputs, Qwen2, Qwen2Config, WeightDtype};

/// Everything one comparison needs, as host data.
#[derive(Debug, Clone)]
pub struct Case {
    pub config: Qwen2Config,
    /// HF names and layout (as `hf::named_tensors` gives them).
    pub weights: Vec<(String, TensorData)>,
    pub batch: usize,
    pub len: usize,
    /// `[batch * len]`
    pub ids: Vec<i64>,
    pub attention: Vec<bool>,
    pub targets: Vec<i64>,
    /// 1 where the target is a real (loss) token
    pub mask: Vec<f32>,
    /// RL data: sampling-time and anchor log-probs `[batch * len]`, advantages `[batch]`
    pub old_logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
    pub advantages: Vec<f32>,
}

impl Case {
    /// Random weights (normal, std 0.1 for weights, 0.05 around 1 for norms) and a random batch
    /// with random left or right padding per row.
    pub fn random(config: &Qwen2Config, batch: usize, len: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize, mean: f32, std: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    // Box-Muller
                    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                    mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        let weights = hf::expected_tensors(config)
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let v = if name.contains("norm") { normal(n, 1.0, 0.05) } else { normal(n, 0.0, 0.1) };
                (name, TensorData::new(v, shape))
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
        let (mut ids, mut attention, mut targets, mut mask) = (vec![], vec![], vec![], vec![]);
        for _ in 0..batch {
            let real = rng.random_range(2..=len);
            let left = rng.random::<bool>();
            let row: Vec<i64> = (0..len).map(|_| rng.random_range(0..config.vocab_size as i64)).collect();
            let att: Vec<bool> = (0..len).map(|t| if left { t >= len - real } else { t < real }).collect();
            for t in 0..len {
                ids.push(row[t]);
                attention.push(att[t]);
                let next_real = t + 1 < len && att[t] && att[t + 1];
                targets.push(if next_real { row[t + 1] } else { 0 });
                mask.push(if next_real { 1.0 } else { 0.0 });
            }
        }
        let n = batch * len;
        let old_logp = (0..n).map(|_| -rng.random_range(0.5f32..6.0)).collect();
        let ref_logp = (0..n).map(|_| -rng.random_range(0.5f32..6.0)).collect();
        let advantages = (0..batch).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Self { config: config.clone(), weights, batch, len, ids, attention, targets, mask, old_logp, ref_logp, advantages }
    }
}

/// One named quantity as host values.
#[derive(Debug, Clone, Serialize)]
pub struct Quantity {
    pub name: String,
    pub values: Vec<f32>,
}

/// Learning rate of the compared AdamW step.
pub const STEP_LR: f64 = 1e-3;

/// Coefficients of the loss terms that [`compute`] sums; [`compute_with`] takes others, so a
/// test can show that a sign flip or a missing term is caught by [`compare`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// Weight of the entropy bonus (subtracted).
    pub entropy_coef: f32,
    /// Weight of the k3 KL term (added).
    pub kl_coef: f32,
}

impl Default for Terms {
    fn default() -> Self {
        Self { entropy_coef: 0.01, kl_coef: 0.1 }
    }
}

/// Every compared quantity of `case` on backend `B`.
pub fn compute<B: FusedAutodiff>(case: &Case, device: &B::Device) -> Vec<Quantity> {
    compute_with::<B>(case, device, Terms::default())
}

/// [`compute`] with the loss terms weighted by `terms`.
///
/// The quantities, in order: logits, log-probs, entropy and SFT loss; the k1/k2/k3 KL; the RL
/// loss in each aggregation mode; `param/P` (every parameter as the backend holds it after
/// loading), `grad/P` (the gradient of the summed losses) and `adamw_update/P` (one AdamW step
/// θ' − θ divided by [`STEP_LR`]: about −sign(g) − wd·θ) for every parameter `P`, named by its
/// module path in visiting order.
pub fn compute_with<B: FusedAutodiff>(case: &Case, device: &B::Device, terms: Terms) -> Vec<Quantity> {
    let model: Qwen2<B> = hf::from_named_tensors(&case.config, case.weights.clone(), WeightDtype::F32, device).expect("case weights match");
    let (b, t) = (case.batch, case.len);
    let inputs = Inputs::new(b, t, case.ids.clone(), case.attention.clone());
    let t2 = |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [b, t]), device);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(case.targets.clone(), [b, t]), device);
    let mask = t2(&case.mask);
    let norm = Normalizer::of_mask(&case.mask, t, t as f32);

    let logits = model.forward(&inputs, None);
    let logp = token_logprobs(logits.clone(), targets);
    let entropy = token_entropy(logits.clone());
    let sft = masked_mean(logp.clone().neg(), mask.clone());
    let adv = Tensor::<B, 1>::from_data(TensorData::new(case.advantages.clone(), [b]), device);
    let (pg, _) = policy_loss(logp.clone(), t2(&case.old_logp), adv, 0.2, 0.28);
    let kl3 = kl(logp.clone(), t2(&case.ref_logp), KlEstimator::K3);
    let mut out = vec![];
    let real_rows: Vec<usize> = (0..b * t).filter(|&i| case.attention[i]).collect();
    let keep_real = |v: Vec<f32>, per: usize| -> Vec<f32> { real_rows.iter().flat_map(|&i| v[i * per..(i + 1) * per].to_vec()).collect() };
    let vocab = case.config.vocab_size;
    out.push(Quantity { name: "logits".into(), values: keep_real(host(logits.clone()), vocab) });
    out.push(Quantity { name: "logprobs".into(), values: masked(host(logp.clone()), &case.mask) });
    out.push(Quantity { name: "entropy".into(), values: masked(host(entropy.clone()), &case.mask) });
    out.push(Quantity { name: "sft_loss".into(), values: host(sft.clone()) });
    for (name, est) in [("kl_k1", KlEstimator::K1), ("kl_k2", KlEstimator::K2), ("kl_k3", KlEstimator::K3)] {
        out.push(Quantity { name: name.into(), values: masked(host(kl(logp.clone(), t2(&case.ref_logp), est)), &case.mask) });
    }
    let mut total = sft;
    for (name, mode) in [("policy_loss_token_mean", AggMode::TokenMean), ("policy_loss_seq_mean_token_mean", AggMode::SeqMeanTokenMean), ("policy_loss_seq_mean_token_sum_norm", AggMode::SeqMeanTokenSumNorm)] {
        let loss = aggregate(pg.clone(), mask.clone(), mode, norm) - aggregate(entropy.clone(), mask.clone(), mode, norm).mul_scalar(terms.entropy_coef)
            + aggregate(kl3.clone(), mask.clone(), mode, norm).mul_scalar(terms.kl_coef);
        out.push(Quantity { name: name.into(), values: host(loss.clone()) });
        total = total + loss;
    }
    let before = per_param(&model, Values);
    let grads = total.backward();
    out.extend(before.iter().map(|(path, v)| Quantity { name: format!("param/{path}"), values: v.clone() }));
    out.extend(per_param(&model, Grad::<B>(&grads)).into_iter().map(|(path, values)| Quantity { name: format!("grad/{path}"), values }));
    let gp = GradientsParams::from_grads(grads, &model);
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).with_epsilon(1e-8).init::<B, Qwen2<B>>();
    let stepped = optim.step(STEP_LR, model, gp);
    for ((path, old), (_, new)) in before.iter().zip(per_param(&stepped.valid(), Values)) {
        let update = old.iter().zip(&new).map(|(o, n)| ((*n as f64 - *o as f64) / STEP_LR) as f32).collect();
        out.push(Quantity { name: format!("adamw_update/{path}"), values: update });
    }
    out
}

fn masked(v: Vec<f32>, mask: &[f32]) -> Vec<f32> {
    v.into_iter().zip(mask).filter(|(_, m)| **m > 0.0).map(|(x, _)| x).collect()
}

fn host<B: FusedOps, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

/// What [`per_param`] reads from each parameter.
trait Read<B: FusedOps> {
    fn read<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Vec<f32>;
}

/// The parameter's values.
struct Values;
impl<B: FusedOps> Read<B> for Values {
    fn read<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
        host(param.val())
    }
}

/// The parameter's gradient (empty when it has none).
struct Grad<'a, B: FusedAutodiff>(&'a B::Gradients);
impl<B: FusedAutodiff> Read<B> for Grad<'_, B> {
    fn read<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
        param.val().grad(self.0).map(host).unwrap_or_default()
    }
}

/// `read` of every float parameter of `model`, named by its module path (`layers.0.mlp...`).
fn per_param<B: FusedOps, R: Read<B>>(model: &impl Module<B>, read: R) -> Vec<(String, Vec<f32>)> {
    struct Paths<R> {
        path: Vec<String>,
        read: R,
        out: Vec<(String, Vec<f32>)>,
    }
    impl<B: FusedOps, R: Read<B>> ModuleVisitor<B> for Paths<R> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values = self.read.read(param);
            self.out.push((self.path.join("."), values));
        }
    }
    let mut v = Paths { path: vec![], read, out: vec![] };
    model.visit(&mut v);
    v.out
}

/// Units in the last place of f32 allowed per term of the longest reduction.
///
/// The backends add in different orders (blocked matmuls, tree vs. serial sums) and use
/// different exp/log: a sum of `n` rounded terms can differ by up to `n` ulps of its scale in
/// the worst case (~√n typically). Measured on flex vs wgpu (lavapipe) over 8 random cases,
/// the worst quantity used 9% of its bound (gradients; `flex_and_wgpu_agree` prints the
/// fraction used per quantity); a sign flip of the 0.01 entropy term or a missing KL term
/// fails every gradient row (`compare_catches_a_sign_flip_and_a_missing_term`).
pub const ULPS_PER_TERM: f32 = 4.0;

/// Longest reduction of `case`'s forward or backward pass: dot products over the hidden,
/// intermediate and vocabulary sizes, gradient sums over every token of the batch.
pub fn reduction_len(case: &Case) -> f32 {
    let c = &case.config;
    [c.hidden_size, c.intermediate_size, c.vocab_size, case.batch * case.len].into_iter().max().unwrap_or(1) as f32
}

/// Allowed difference of a quantity relative to its scale (`rel · max|reference|`), from the dtype (f32, ε =
/// 2⁻²³), the case's [`reduction_len`] `n` and the quantity's kind:
/// - `param/`: loading is a copy: bit for bit (0).
/// - forward values: one ulp of the scale plus [`ULPS_PER_TERM`] ulps per reduced term,
///   relative to the quantity's largest magnitude (the KL estimators and RL losses, which are
///   differences of larger terms, propagate the observed log-prob difference through their
///   formula instead: [`forward_allowed`]); gradients run the chain twice (forward and
///   backward), so twice that.
/// - `adamw_update/` (the step over the lr, ≈ −sign(g) − wd·θ): compared only where the
///   reference gradient is larger than twice its own allowed difference, so that the sign is
///   determined; there it may differ by the rounding of θ' − θ (4 ulps of max|θ|, over the lr).
///   A step of the wrong sign differs by 2, a missing step by 1, half a step by 0.5.
pub fn tolerance(name: &str, n: f32) -> f32 {
    let eps = f32::EPSILON;
    if name.starts_with("param/") {
        0.0
    } else if name.starts_with("grad/") {
        eps * (1.0 + 2.0 * ULPS_PER_TERM * n)
    } else if name.starts_with("adamw_update/") {
        4.0 * eps / STEP_LR as f32
    } else {
        eps * (1.0 + ULPS_PER_TERM * n)
    }
}

/// Scale of the gradient of parameter `path` in the reference quantities `a`: its largest
/// magnitude, or, where the reference gradient is exactly zero, the largest gradient of the
/// same decoder layer (of the whole model outside the layers).
///
/// A gradient can be zero in exact arithmetic while the other backend computes it as the
/// rounding left over from a cancellation: with one visible key per scored query (a row
/// with two real tokens), softmax's backward `P ⊙ (dP − Σ P·dP)` is `dP − dP`, so the q and k
/// projections get no gradient. flex gives 0 exactly; wgpu gave 4.2e-10, against an
/// allowed difference of 0 relative to a zero scale. That rounding is relative to the
/// upstream gradient that cancelled, which is what the layer's other gradients measure.
pub fn grad_scale(a: &[Quantity], path: &str) -> f32 {
    use t1_model::compare::max_abs;
    let own = a.iter().find(|q| q.name.strip_prefix("grad/") == Some(path)).map_or(0.0, |q| max_abs(&q.values));
    if own > 0.0 {
        return own;
    }
    // "layers.3.self_attn.q_proj.weight" -> "layers.3."; any other path -> every gradient
    let prefix = match path.strip_prefix("layers.").and_then(|rest| rest.split_once('.')) {
        Some((layer, _)) => format!("grad/layers.{layer}."),
        None => "grad/".to_string(),
    };
    a.iter().filter(|q| q.name.starts_with(&prefix)).map(|q| max_abs(&q.values)).fold(0.0, f32::max)
}

/// Allowed difference of a forward quantity that is a difference of larger terms, where a
/// bound relative to its own value would be wrong: its rounding is relative to the terms
/// combined, not to the (possibly tiny) value left. `None` for the other quantities, which
/// are compared on `rel · max|reference|` ([`tolerance`]).
///
/// Built by propagating the log-probs' *observed* difference between the two backends
/// (`Δ = |logp_a − logp_b|` per token; the `logprobs` row checks Δ itself against its own
/// bound), and likewise the entropy's, through each formula, plus the formula's own rounding:
/// a few ulps of each term, and for `exp(x)` the 3 + 2|x| ulps that Vulkan allows. Using the
/// observed Δ rather than the log-probs' allowed error keeps the bound tight when that allowed
/// error is large (it grows with the vocabulary: about 1 nat on Qwen's 151,936). Per masked
/// token, with `r` = ref − logp, `δr = Δ + 4ε|r|` (the subtraction rounds each side by up to
/// half an ulp of r; on wgpu k1 used 0.68 of `Δ + 2ε|r|`, so twice that), ρ = exp(logp − old);
/// the largest over tokens:
/// - `kl_k1` = −r: `δr`;
/// - `kl_k2` = r²/2: `(|r| + δr)·δr + ε(16 + 4|r|)·r²` (a GPU's pow is exp2(2·log2 r), tens of
///   ulps);
/// - `kl_k3` = eʳ − r − 1: `(|eʳ − 1| + eʳ⁺ᵟʳ·δr)·δr + ε·((4 + 2|r|)·eʳ + 2(|r| + 1))` (to
///   second order). CI saw flex and wgpu differ by 1.19e-7, one ulp of eʳ ≈ 1, on a case
///   whose largest k3 was about 1e-3 (r ≈ 0.05): a bound relative to k3 allowed 3.5e-8;
/// - `policy_loss_*` (pg − c_H·H + c_KL·k3 aggregated, [`Terms::default`]'s coefficients):
///   `|A|·ρ·(eᵟ·δ + ε(3 + 2|x| + |logp| + |old|)) + c_H·ΔH + c_KL·(k3's)` per token with
///   `δ = Δ + ε|x|`, plus the sum's rounding, `ε(1 + ULPS_PER_TERM·m)` times the largest
///   per-token magnitude `|A|(ρ + 1) + c_H·H + c_KL·(eʳ + |r| + 1)` over the `m` masked tokens.
///   Every aggregation mode is a weighted mean with weights summing to at most 1 over terms
///   whose signs differ (advantages of both signs), so the per-token bounds bound it.
///
/// A NaN or infinity on either side makes the allowed difference NaN, which fails.
pub fn forward_allowed(case: &Case, a: &[Quantity], b: &[Quantity], name: &str) -> Option<f32> {
    let eps = f32::EPSILON;
    let find = |q: &[Quantity], n: &str| q.iter().find(|x| x.name == n).map(|x| x.values.clone());
    let (logp, entropy) = (find(a, "logprobs")?, find(a, "entropy")?);
    let (logp_b, entropy_b) = (find(b, "logprobs")?, find(b, "entropy")?);
    // the masked tokens' flat positions, in the order `logprobs` holds them
    let tokens: Vec<usize> = (0..case.mask.len()).filter(|&i| case.mask[i] > 0.0).collect();
    let m = tokens.len();
    if m == 0 || [logp.len(), entropy.len(), logp_b.len(), entropy_b.len()].iter().any(|&l| l != m) {
        return None;
    }
    let sum_rounding = eps * (1.0 + ULPS_PER_TERM * m as f32);
    let terms = Terms::default();
    let per_token = |k: usize, i: usize| -> Option<f32> {
        let gap = (logp[k] - logp_b[k]).abs();
        let r = case.ref_logp[i] - logp[k];
        let dr = gap + 4.0 * eps * r.abs();
        let k3 = ((r.exp() - 1.0).abs() + (r + dr).exp() * dr) * dr + eps * ((4.0 + 2.0 * r.abs()) * r.exp() + 2.0 * (r.abs() + 1.0));
        Some(match name {
            "kl_k1" => dr,
            "kl_k2" => (r.abs() + dr) * dr + eps * (16.0 + 4.0 * r.abs()) * r * r,
            "kl_k3" => k3,
            _ if name.starts_with("policy_loss") => {
                let x = logp[k] - case.old_logp[i];
                let dx = gap + eps * x.abs();
                let (rho, adv) = (x.exp(), case.advantages[i / case.len.max(1)].abs());
                let propagated = adv * rho * (dx.exp() * dx + eps * (3.0 + 2.0 * x.abs() + logp[k].abs() + case.old_logp[i].abs()));
                let magnitude = adv * (rho + 1.0) + terms.entropy_coef.abs() * entropy[k].abs() + terms.kl_coef.abs() * (r.exp() + r.abs() + 1.0);
                let dh = (entropy[k] - entropy_b[k]).abs();
                propagated + terms.entropy_coef.abs() * dh + terms.kl_coef.abs() * k3 + sum_rounding * magnitude
            }
            _ => return None,
        })
    };
    // f32::max would drop a NaN: keep it, so that it fails
    tokens.iter().enumerate().map(|(k, &i)| per_token(k, i)).try_fold(0.0f32, |m, v| v.map(|v| if v.is_nan() || m.is_nan() { f32::NAN } else { m.max(v) }))
}

/// One row of the comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub quantity: String,
    pub max_abs: f32,
    pub max_rel: f32,
    pub allowed: f32,
    pub pass: bool,
}

/// Compares two backends' quantities of one case (same order) under [`tolerance`]. Any NaN or
/// infinity, on either side, fails its row; so do different lengths.
pub fn compare(case: &Case, a: &[Quantity], b: &[Quantity]) -> Vec<Row> {
    use t1_model::compare::{max_abs, max_abs_diff};
    assert_eq!(a.len(), b.len(), "quantities must come in the same order");
    let n = reduction_len(case);
    let find = |name: &str| a.iter().find(|q| q.name == name);
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.name, y.name, "quantities must come in the same order");
            let rel = tolerance(&x.name, n);
            if x.values.len() != y.values.len() {
                return Row { quantity: x.name.clone(), max_abs: f32::INFINITY, max_rel: f32::INFINITY, allowed: 0.0, pass: false };
            }
            let (xs, ys, scale): (Vec<f32>, Vec<f32>, f32) = match x.name.strip_prefix("adamw_update/") {
                Some(path) => {
                    // entries whose gradient sign the backends may legitimately disagree on are left out
                    let (g, theta) = (find(&format!("grad/{path}")), find(&format!("param/{path}")));
                    let (g, theta) = (g.map(|q| q.values.as_slice()).unwrap_or(&[]), theta.map(|q| q.values.as_slice()).unwrap_or(&[]));
                    let g_allowed = tolerance("grad/", n) * grad_scale(a, path);
                    let keep: Vec<usize> = (0..x.values.len()).filter(|&i| g.get(i).is_none_or(|v| !(v.abs() <= 2.0 * g_allowed))).collect();
                    let pick = |v: &[f32]| keep.iter().map(|&i| v[i]).collect();
                    (pick(&x.values), pick(&y.values), max_abs(theta))
                }
                None => {
                    let scale = match x.name.strip_prefix("grad/") {
                        Some(path) => grad_scale(a, path),
                        None => max_abs(&x.values),
                    };
                    (x.values.clone(), y.values.clone(), scale)
                }
            };
            let max_abs_d = max_abs_diff(&xs, &ys);
            let allowed = forward_allowed(case, a, b, &x.name).unwrap_or(rel * scale);
            let max_rel = if scale > 0.0 { max_abs_d / scale } else { max_abs_d };
            Row { quantity: x.name.clone(), max_abs: max_abs_d, max_rel, allowed, pass: allowed.is_finite() && max_abs_d <= allowed }
        })
        .collect()
}
