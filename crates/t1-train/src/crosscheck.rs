//! Cross-backend agreement: the same model, batch and RL data on two backends must give the
//! same logits, log-probs, losses, gradients and AdamW step, within [`tolerance`].
//!
//! A [`Case`] is host data (HF-named weights, token ids with padding, RL tensors); [`compute`]
//! evaluates every quantity on one backend and returns host vectors; [`compare`] makes the table.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
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

/// Every compared quantity of `case` on backend `B`.
pub fn compute<B: AutodiffBackend>(case: &Case, device: &B::Device) -> Vec<Quantity> {
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
        let loss = aggregate(pg.clone(), mask.clone(), mode, norm) - aggregate(entropy.clone(), mask.clone(), mode, norm).mul_scalar(0.01)
            + aggregate(kl3.clone(), mask.clone(), mode, norm).mul_scalar(0.1);
        out.push(Quantity { name: name.into(), values: host(loss.clone()) });
        total = total + loss;
    }
    let grads = total.backward();
    out.extend(gradients(&model, &grads));
    let gp = GradientsParams::from_grads(grads, &model);
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).with_epsilon(1e-8).init::<B, Qwen2<B>>();
    let stepped = optim.step(STEP_LR, model, gp);
    for (name, data) in hf::named_tensors(&stepped.valid()) {
        out.push(Quantity { name: format!("adamw_step/{name}"), values: data.convert::<f32>().to_vec::<f32>().expect("f32") });
    }
    out
}

fn masked(v: Vec<f32>, mask: &[f32]) -> Vec<f32> {
    v.into_iter().zip(mask).filter(|(_, m)| **m > 0.0).map(|(x, _)| x).collect()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

/// The gradient of every parameter, named by its module path.
fn gradients<B: AutodiffBackend>(model: &Qwen2<B>, grads: &B::Gradients) -> Vec<Quantity> {
    struct Grads<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        path: Vec<String>,
        out: Vec<Quantity>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values = param.val().grad(self.grads).map(host).unwrap_or_default();
            self.out.push(Quantity { name: format!("grad/{}", self.path.join(".")), values });
        }
    }
    let mut v = Grads::<B> { grads, path: vec![], out: vec![] };
    model.visit(&mut v);
    v.out
}

/// Allowed difference of a quantity: |a − b| ≤ `abs` + `rel` · max|a| over the quantity.
///
/// Why these numbers (f32 everywhere; the backends sum in different orders and use different
/// exp/log implementations):
/// - forward values (logits, log-probs, entropy, KL, losses): a few ulps per op through a few
///   layers, ~1e-6 relative seen; 1e-4 leaves room for deeper models.
/// - gradients: longer reduction chains (sums over batch and positions); 1e-3 relative to the
///   largest entry of the parameter's gradient.
/// - the AdamW step: Adam divides by sqrt(v), so a gradient entry near 0 can move by up to
///   `STEP_LR` in either direction on tiny rounding; the bound is 2·`STEP_LR` absolute plus
///   1e-4 relative to the parameter, i.e. the step never differs by more than one step.
pub fn tolerance(name: &str) -> (f32, f32) {
    if name.starts_with("grad/") {
        (1e-7, 1e-3)
    } else if name.starts_with("adamw_step/") {
        (2.0 * STEP_LR as f32, 1e-4)
    } else {
        (1e-6, 1e-4)
    }
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

/// Compares two backends' quantities (same order) under [`tolerance`].
pub fn compare(a: &[Quantity], b: &[Quantity]) -> Vec<Row> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.name, y.name, "quantities must come in the same order");
            let scale = x.values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (abs, rel) = tolerance(&x.name);
            let allowed = abs + rel * scale;
            let (mut max_abs, mut max_rel) = (0f32, 0f32);
            let mut nan = x.values.len() != y.values.len();
            for (p, q) in x.values.iter().zip(&y.values) {
                if p.is_nan() != q.is_nan() {
                    nan = true;
                }
                let d = (p - q).abs();
                max_abs = max_abs.max(d);
                max_rel = max_rel.max(d / p.abs().max(1e-12));
            }
            Row { quantity: x.name.clone(), max_abs, max_rel, allowed, pass: !nan && max_abs <= allowed }
        })
        .collect()
}
