//! Hand-computed numbers and properties of the recipe's functions (CPU backend).

use super::*;
use burn::backend::Flex;
use burn::tensor::TensorData;
use proptest::prelude::*;

type Tb = Flex;

fn t2(v: &[f32], b: usize, t: usize) -> Tensor<Tb, 2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, t]), &Default::default())
}
fn t1(v: &[f32]) -> Tensor<Tb, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}
fn vals<const D: usize>(t: Tensor<Tb, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}
fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

#[test]
fn logprobs_and_entropy_by_hand() {
    // logits [1, 1, 2] = [0, ln 3] → p = [1/4, 3/4]
    let logits: Tensor<Tb, 3> = Tensor::from_data(TensorData::new(vec![0.0, 3f32.ln()], [1, 1, 2]), &Default::default());
    let targets: Tensor<Tb, 2, Int> = Tensor::from_data(TensorData::new(vec![1i64], [1, 1]), &Default::default());
    close(&vals(token_logprobs(logits.clone(), targets)), &[0.75f32.ln()], 1e-6);
    let h = -(0.25f32 * 0.25f32.ln() + 0.75 * 0.75f32.ln());
    close(&vals(token_entropy(logits)), &[h], 1e-6);
}

#[test]
fn advantages_by_hand() {
    // RLOO: r = [1, 0, 0, 1] → 1 − 1/3, 0 − 2/3, ...
    close(&advantages(&[1.0, 0.0, 0.0, 1.0], 4, Baseline::Rloo), &[2.0 / 3.0, -2.0 / 3.0, -2.0 / 3.0, 2.0 / 3.0], 1e-6);
    // GRPO: mean 0.5, unbiased std sqrt(1/3)
    let s = (1.0f32 / 3.0).sqrt();
    close(&advantages(&[1.0, 0.0, 0.0, 1.0], 4, Baseline::Grpo), &[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], 1e-4);
    close(&advantages(&[3.0, 1.0], 2, Baseline::None), &[3.0, 1.0], 0.0);
    // two groups are independent
    close(&advantages(&[1.0, 1.0, 0.0, 1.0], 2, Baseline::Rloo), &[0.0, 0.0, -1.0, 1.0], 1e-6);
}

#[test]
fn kl_estimators_by_hand() {
    let (lp, lr) = (t2(&[-1.0, -2.0], 1, 2), t2(&[-1.5, -1.0], 1, 2));
    close(&vals(kl(lp.clone(), lr.clone(), KlEstimator::K1)), &[0.5, -1.0], 1e-6);
    close(&vals(kl(lp.clone(), lr.clone(), KlEstimator::K2)), &[0.125, 0.5], 1e-6);
    // k3 with r = log π_ref/π = [-0.5, 1]: e^r − 1 − r
    let k3 = |r: f32| r.exp() - 1.0 - r;
    close(&vals(kl(lp, lr, KlEstimator::K3)), &[k3(-0.5), k3(1.0)], 1e-6);
}

#[test]
fn policy_loss_by_hand() {
    // ratios e^0.5 ≈ 1.6487 (clipped to 1.2 for A > 0), e^-0.5 ≈ 0.6065 (clipped to 0.8 for A < 0)
    let logp = t2(&[0.5, -0.5], 2, 1);
    let old = t2(&[0.0, 0.0], 2, 1);
    let (loss, clip) = policy_loss(logp, old, t1(&[1.0, -1.0]), 0.2, 0.2);
    // A>0: −min(1.6487, 1.2) = −1.2 (clipped); A<0: −min(−0.6065, −0.8) = 0.8 (clipped)
    close(&vals(loss), &[-1.2, 0.8], 1e-5);
    close(&vals(clip), &[1.0, 1.0], 0.0);
    // asymmetric ε: ε_high = 0.28 lets the ratio reach 1.28
    let (loss, _) = policy_loss(t2(&[0.5], 1, 1), t2(&[0.0], 1, 1), t1(&[2.0]), 0.2, 0.28);
    close(&vals(loss), &[-2.56], 1e-5);
}

#[test]
fn aggregation_modes_by_hand() {
    // seq 0: tokens [1, 3] (mask 1, 1); seq 1: tokens [5, x] (mask 1, 0)
    let loss = t2(&[1.0, 3.0, 5.0, 100.0], 2, 2);
    let mask_v = [1.0, 1.0, 1.0, 0.0];
    let norm = Normalizer::of_mask(&mask_v, 2, 4.0);
    let mask = t2(&mask_v, 2, 2);
    close(&vals(aggregate(loss.clone(), mask.clone(), AggMode::TokenMean, norm)), &[3.0], 1e-6);
    close(&vals(aggregate(loss.clone(), mask.clone(), AggMode::SeqMeanTokenMean, norm)), &[3.5], 1e-6);
    close(&vals(aggregate(loss, mask, AggMode::SeqMeanTokenSumNorm, norm)), &[9.0 / 8.0], 1e-6);
}

#[test]
fn masked_mean_by_hand() {
    // (1 + 3 + 6) / 3 over the mask's ones; the masked-out 100 does not count
    let x = t2(&[1.0, 100.0, 3.0, 6.0], 2, 2);
    close(&vals(masked_mean(x.clone(), t2(&[1.0, 0.0, 1.0, 1.0], 2, 2))), &[10.0 / 3.0], 1e-6);
    // an empty mask gives 0, not NaN
    close(&vals(masked_mean(x, t2(&[0.0; 4], 2, 2))), &[0.0], 0.0);
    // a NaN in a masked-out position is multiplied by 0 and still poisons the sum: visible, not hidden
    let nan = vals(masked_mean(t2(&[1.0, f32::NAN], 1, 2), t2(&[1.0, 0.0], 1, 2)));
    assert!(nan[0].is_nan(), "{nan:?}");
}

#[test]
fn ema_anchor_moves_the_reference_towards_the_policy() {
    use burn::nn::{Linear, LinearConfig};
    let device = Default::default();
    let policy: Linear<Tb> = LinearConfig::new(2, 2).init(&device);
    let reference: Linear<Tb> = LinearConfig::new(2, 2).init(&device);
    let (p, r) = (vals(policy.weight.val()), vals(reference.weight.val()));
    let updated = ema_update(reference, &policy, 0.75);
    let want: Vec<f32> = r.iter().zip(&p).map(|(r, p)| 0.75 * r + 0.25 * p).collect();
    close(&vals(updated.weight.val()), &want, 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn rloo_and_grpo_advantages_sum_to_zero_in_each_group(
        rewards in proptest::collection::vec(-2.0f32..2.0, 2..9), groups in 1usize..4
    ) {
        let all: Vec<f32> = (0..groups).flat_map(|g| rewards.iter().map(move |r| r + g as f32)).collect();
        for baseline in [Baseline::Rloo, Baseline::Grpo] {
            let a = advantages(&all, rewards.len(), baseline);
            for group in a.chunks(rewards.len()) {
                prop_assert!(group.iter().sum::<f32>().abs() < 1e-3, "{baseline:?}: {group:?}");
            }
        }
    }

    #[test]
    fn a_constant_added_to_all_rewards_leaves_advantages_unchanged(
        rewards in proptest::collection::vec(-2.0f32..2.0, 2..9), c in -5.0f32..5.0
    ) {
        let shifted: Vec<f32> = rewards.iter().map(|r| r + c).collect();
        for baseline in [Baseline::Rloo, Baseline::Grpo] {
            let (a, b) = (advantages(&rewards, rewards.len(), baseline), advantages(&shifted, rewards.len(), baseline));
            for (x, y) in a.iter().zip(&b) {
                prop_assert!((x - y).abs() < 2e-3 * (1.0 + x.abs()), "{baseline:?}: {a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn k3_and_k2_are_never_negative(lp in proptest::collection::vec(-8.0f32..0.0, 1..16), lr in proptest::collection::vec(-8.0f32..0.0, 16)) {
        let n = lp.len();
        for est in [KlEstimator::K2, KlEstimator::K3] {
            let k = vals(kl(t2(&lp, 1, n), t2(&lr[..n], 1, n), est));
            prop_assert!(k.iter().all(|&x| x >= -1e-6), "{est:?}: {k:?}");
        }
    }

    #[test]
    fn clipping_is_a_no_op_at_ratio_one(adv in proptest::collection::vec(-3.0f32..3.0, 1..8), lp in -5.0f32..0.0) {
        let b = adv.len();
        let logp = t2(&vec![lp; b], b, 1);
        let (loss, clip) = policy_loss(logp.clone(), logp, t1(&adv), 0.2, 0.28);
        let want: Vec<f32> = adv.iter().map(|a| -a).collect();
        close(&vals(loss), &want, 1e-6);
        prop_assert!(vals(clip).iter().all(|&c| c == 0.0));
    }

    #[test]
    fn shard_losses_add_up_to_the_whole_batch_loss(
        seqs in proptest::collection::vec((proptest::collection::vec(-3.0f32..3.0, 6), 1usize..7), 2..8),
        split in 1usize..7,
    ) {
        let t = 6;
        let b = seqs.len();
        let split = split.min(b - 1).max(1);
        let loss: Vec<f32> = seqs.iter().flat_map(|(l, _)| l.clone()).collect();
        let mask: Vec<f32> = seqs.iter().flat_map(|(_, n)| (0..t).map(move |i| if i < *n { 1.0 } else { 0.0 })).collect();
        let norm = Normalizer::of_mask(&mask, t, t as f32);
        for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean, AggMode::SeqMeanTokenSumNorm] {
            let whole = vals(aggregate(t2(&loss, b, t), t2(&mask, b, t), mode, norm))[0];
            let (a, c) = (split * t, b - split);
            let first = vals(aggregate(t2(&loss[..a], split, t), t2(&mask[..a], split, t), mode, norm))[0];
            let second = vals(aggregate(t2(&loss[a..], c, t), t2(&mask[a..], c, t), mode, norm))[0];
            prop_assert!((whole - first - second).abs() < 1e-4 * (1.0 + whole.abs()), "{mode:?}: {whole} vs {first} + {second}");
        }
    }
}
