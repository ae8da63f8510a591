//! Data parallelism on one machine: the shards of a batch run forward + backward on their own
//! threads and their gradients are summed.
//!
//! On the CPU backend most of a small model's step is element-wise work that burn-flex runs on
//! one thread, so two shards on two cores nearly halve the step time. Each shard works on its
//! own autodiff copy of the model ([`AutodiffModule::from_inner`]: same parameter ids, new
//! graph leaves), so the shards build independent graphs whose backward passes do not share
//! burn-autodiff's per-graph lock. The losses must be normalised so that their *sum* is the
//! batch loss (e.g. divide by the whole batch's token count); the summed gradients then equal
//! the whole batch's up to float summation order, whatever the number of shards.

use t1_model::FusedAutodiff;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use t1_model::Qwen2;

/// Sums the gradients `grads(model, shard)` computes over `shards`, one thread per shard (no
/// threads for a single shard). `grads` returns the shard's gradients, its loss value and any
/// per-shard statistics ([`crate::checkpoint::loss_grads`] makes them from a loss). Returns the
/// summed gradients, the summed loss values and the statistics in shard order.
pub fn sharded_grads<B, S, E, F>(model: &Qwen2<B>, shards: Vec<S>, grads: F) -> (GradientsParams, f32, Vec<E>)
where
    B: FusedAutodiff,
    S: Send,
    E: Send,
    F: Fn(&Qwen2<B>, S) -> (GradientsParams, f32, E) + Sync,
{
    let one = |m: &Qwen2<B>, shard: S| grads(m, shard);
    let results: Vec<_> = if shards.len() == 1 {
        shards.into_iter().map(|s| one(model, s)).collect()
    } else {
        let one = &one;
        std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .into_iter()
                .map(|shard| {
                    let inner = model.valid();
                    scope.spawn(move || one(&Qwen2::from_inner(inner), shard))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        })
    };
    let mut accum = GradientsAccumulator::<Qwen2<B>>::new();
    let (mut total, mut extras) = (0.0f32, Vec::with_capacity(results.len()));
    for (grads, value, extra) in results {
        accum.accumulate(model, grads);
        total += value;
        extras.push(extra);
    }
    (accum.grads(), total, extras)
}

/// Splits `0..n` into `parts` contiguous ranges of near-equal size (no empty range).
pub fn split_even(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + (i < extra) as usize;
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::split_even;

    #[test]
    fn split_even_covers_the_range_in_order() {
        assert_eq!(split_even(5, 2), vec![0..3, 3..5]);
        assert_eq!(split_even(1, 4), vec![0..1]);
        assert_eq!(split_even(0, 2), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split_even(6, 3), vec![0..2, 2..4, 4..6]);
    }
}
