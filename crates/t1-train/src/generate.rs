//! Rollouts in the same engine as training: batched sampling with the KV cache.
//!
//! Prompts are left-padded and prefilled once; each step feeds one token per sequence, the
//! last logits come to the host, and a token is drawn with temperature, top-k and top-p from a
//! seeded ChaCha RNG (reproducible on CPU). For every sampled token we record its
//! log-probability under the temperature-scaled distribution, log softmax(logits / T), which is
//! what the RL trainer recomputes, so the gap between the two measures engine agreement.

use t1_model::FusedOps;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use t1_cpu::HostEngine;
use t1_data::{ChatTokenizer, Problem};
use t1_model::{BurnDecoder, Decoder, Inputs, KvCache, Qwen2, Qwen2Config};

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Generation stops after this many new tokens (the response is then `truncated`).
    pub max_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256 }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, max_new_tokens }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be > 0".into());
        }
        Ok(())
    }
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// New tokens, including the final EOS when one was produced.
    pub tokens: Vec<u32>,
    /// log π(token) under the temperature-scaled distribution, one per token.
    pub logprobs: Vec<f32>,
    /// True when `max_new_tokens` was reached without EOS.
    pub truncated: bool,
}

/// The token ids a response ends at, in RL, evaluation and `t1 generate` alike: the model's
/// `eos_token_id`s (an int or a list in config.json) and the tokenizer's EOS.
pub fn stop_ids(config: &Qwen2Config, tokenizer: &ChatTokenizer) -> Vec<u32> {
    let mut ids = config.eos_token_ids();
    if !ids.contains(&tokenizer.eos_id()) {
        ids.push(tokenizer.eos_id());
    }
    ids
}

/// Held-out answer accuracy: the fraction of `problems` whose response, decoded with
/// `sampling` (greedy, or sampled from a fixed seed so that checkpoints are compared on the
/// same stream), the grader (the RL reward's own function) marks correct. `batch` rows per
/// generation call, each call cut into `threads` shards.
/// Responses end at a token of `stop` ([`stop_ids`], the set RL stops on).
pub fn eval_accuracy<B: FusedOps>(
    model: &Qwen2<B>,
    tokenizer: &ChatTokenizer,
    problems: &[Problem],
    sampling: &SamplingConfig,
    stop: &[u32],
    batch: usize,
    threads: usize,
) -> Result<f32, t1_data::DataError> {
    if problems.is_empty() {
        return Ok(0.0);
    }
    let grader = t1_reward::GraderConfig::default();
    let cfg = sampling;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    for chunk in problems.chunks(batch.max(1)) {
        let prompts = chunk.iter().map(|p| tokenizer.encode_prompt(&p.prompt)).collect::<Result<Vec<_>, _>>()?;
        let outs = generate_sharded(model, &prompts, cfg, stop, tokenizer.pad_id(), &mut rng, threads);
        for (p, o) in chunk.iter().zip(&outs) {
            let text = tokenizer.decode(&o.tokens);
            if t1_reward::grade(&text, &p.answer, &grader).correct {
                correct += 1;
            }
        }
    }
    Ok(correct as f32 / problems.len() as f32)
}

/// Samples one response per prompt (prompts may differ in length).
pub fn generate<B: FusedOps>(
    model: &Qwen2<B>,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    eos: &[u32],
    pad: u32,
    rng: &mut ChaCha8Rng,
) -> Vec<Rollout> {
    generate_with(model, HostEngine::new(model), 1, prompts, std::slice::from_ref(cfg), eos, pad, &mut [(0..prompts.len(), rng)])
}

/// One batch of requests decoded together (`t1 serve`): row `i` is drawn with `cfgs[i]` (its
/// own temperature, top-p, top-k and `max_new_tokens`; a row that reaches its own budget stops
/// there, `truncated`) from the stream of the range that holds it, and the batch's steps are
/// split between `threads` threads on the CPU engine. `engine` is `HostEngine::new(model)`,
/// made once by a caller that decodes many batches with the same weights (packing them takes
/// about a second per call at 0.5B); `None` decodes through burn. With one config and one
/// stream it is [`generate`].
#[allow(clippy::too_many_arguments)]
pub fn generate_rows<B: FusedOps>(
    model: &Qwen2<B>,
    engine: Option<HostEngine>,
    prompts: &[Vec<u32>],
    cfgs: &[SamplingConfig],
    eos: &[u32],
    pad: u32,
    streams: &mut [(Range<usize>, &mut ChaCha8Rng)],
    threads: usize,
) -> Vec<Rollout> {
    assert_eq!(cfgs.len(), prompts.len(), "one sampling config per row");
    generate_with(model, engine, threads.max(1), prompts, cfgs, eos, pad, streams)
}

/// [`generate`] decoding through burn even where the CPU engine would run (benchmarks compare
/// the two paths).
pub fn generate_through_burn<B: FusedOps>(model: &Qwen2<B>, prompts: &[Vec<u32>], cfg: &SamplingConfig, eos: &[u32], pad: u32, rng: &mut ChaCha8Rng) -> Vec<Rollout> {
    generate_with(model, None, 1, prompts, std::slice::from_ref(cfg), eos, pad, &mut [(0..prompts.len(), rng)])
}

/// [`generate`] with the CPU engine for the model made by the caller (`None`: decoding through
/// burn) and run on `threads` threads, the tokens of the rows in each range drawn from its own
/// stream; `cfgs` holds one config for every row, or one per row.
#[allow(clippy::too_many_arguments)]
fn generate_with<B: FusedOps>(
    model: &Qwen2<B>,
    engine: Option<HostEngine>,
    threads: usize,
    prompts: &[Vec<u32>],
    cfgs: &[SamplingConfig],
    eos: &[u32],
    pad: u32,
    streams: &mut [(Range<usize>, &mut ChaCha8Rng)],
) -> Vec<Rollout> {
    let b = prompts.len();
    if b == 0 {
        return vec![];
    }
    let cfg = |row: usize| if cfgs.len() == 1 { &cfgs[0] } else { &cfgs[row] };
    let max_steps = (0..b).map(|row| cfg(row).max_new_tokens).max().unwrap_or(0);
    let stream_of: Vec<usize> = (0..b).map(|row| streams.iter().position(|(r, _)| r.contains(&row)).expect("every row has a stream")).collect();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    // left padding: every prompt ends at the same column, so the next token column is shared
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    for p in prompts {
        let pad_len = width - p.len();
        ids.extend(std::iter::repeat_n(pad as i64, pad_len).chain(p.iter().map(|&t| t as i64)));
        mask.extend((0..width).map(|i| i >= pad_len));
    }
    let mut key_mask: Vec<Vec<bool>> = mask.chunks(width).map(|c| c.to_vec()).collect();
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let vocab = model.vocab_size();
    let (mut last, cache) = prefill(model, b, width, ids, mask, threads);
    // made at the first step: a generation that ends at its first token copies nothing to the
    // host and starts no threads
    let mut prefilled = Some(cache);
    let mut decoder: Option<Box<dyn Decoder + '_>> = None;

    let mut out: Vec<Rollout> = (0..b).map(|_| Rollout { tokens: vec![], logprobs: vec![], truncated: false }).collect();
    // ended at a stop id; a row that is not ended after its own budget is truncated
    let mut done = vec![false; b];
    let finished = |row: usize, done: &[bool], out: &[Rollout]| done[row] || out[row].tokens.len() >= cfg(row).max_new_tokens;
    for step in 0..max_steps {
        let mut step_ids = Vec::with_capacity(b);
        for row in 0..b {
            if finished(row, &done, &out) {
                step_ids.push(pad as i64);
                key_mask[row].push(false);
                continue;
            }
            let (tok, lp) = sample(&last[row * vocab..(row + 1) * vocab], cfg(row), streams[stream_of[row]].1);
            out[row].tokens.push(tok);
            out[row].logprobs.push(lp);
            if eos.contains(&tok) {
                done[row] = true;
            }
            step_ids.push(tok as i64);
            key_mask[row].push(true);
        }
        if (0..b).all(|row| finished(row, &done, &out)) || step + 1 == max_steps {
            break;
        }
        let positions = next_pos.clone();
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let inputs = Inputs::step(step_ids, positions, key_mask.concat());
        let decoder = decoder.get_or_insert_with(|| {
            let cache = prefilled.take().expect("the prefill's cache, taken once");
            match &engine {
                Some(engine) => Box::new(engine.decoder(cache, b, threads)),
                None => Box::new(BurnDecoder { model, cache }),
            }
        });
        last = decoder.step(&inputs);
    }
    for (r, d) in out.iter_mut().zip(&done) {
        r.truncated = !d;
    }
    out
}

/// The prompts `ids` `[b, width]` (left-padded, `mask`) through the model: the last logits of
/// every row `[b * vocab]` and the KV cache. With `threads > 1` the rows are cut into shards
/// prefilled on their own threads (burn-flex runs element-wise ops on one thread) and the caches
/// joined.
fn prefill<B: FusedOps>(model: &Qwen2<B>, b: usize, width: usize, ids: Vec<i64>, mask: Vec<bool>, threads: usize) -> (Vec<f32>, KvCache<B>) {
    let vocab = model.vocab_size();
    let run = |m: &Qwen2<B>, rows: Range<usize>| {
        let mut cache = KvCache::new(m.num_layers());
        let (ids, mask) = (ids[rows.start * width..rows.end * width].to_vec(), mask[rows.start * width..rows.end * width].to_vec());
        let logits = m.forward(&Inputs::new(rows.len(), width, ids, mask), Some(&mut cache));
        (last_logits(logits, vocab), cache)
    };
    if threads <= 1 || b < 2 {
        return run(model, 0..b);
    }
    let (lasts, caches): (Vec<_>, Vec<_>) = on_threads(model, crate::parallel::split_even(b, threads), run).into_iter().unzip();
    (lasts.concat(), KvCache::cat(caches))
}

/// [`generate`] with the batch cut into `threads` shards, each drawn from its own ChaCha
/// stream seeded from `rng` and decoded on its own thread — or, on the CPU engine
/// ([`HostEngine`]), prefilled on its own thread and then decoded with the others as
/// one batch split between `threads` threads, which draws the same tokens. Reproducible for a
/// given `threads`, and equal to [`generate`] (same stream) when `threads` is 1.
pub fn generate_sharded<B: FusedOps>(
    model: &Qwen2<B>,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    eos: &[u32],
    pad: u32,
    rng: &mut ChaCha8Rng,
    threads: usize,
) -> Vec<Rollout> {
    if threads <= 1 || prompts.len() < 2 {
        return generate(model, prompts, cfg, eos, pad, rng);
    }
    let shards: Vec<_> = crate::parallel::split_even(prompts.len(), threads).into_iter().map(|r| (r, rng.random::<u64>())).collect();
    let engine = HostEngine::new(model);
    if engine.is_some() {
        // Decoding on the host splits each step between `threads` threads itself, reading each
        // weight once per step for the whole batch: one batch, each shard's rows drawn from the
        // shard's own stream (the tokens of decoding the shards on their own threads).
        let mut rngs: Vec<ChaCha8Rng> = shards.iter().map(|(_, seed)| ChaCha8Rng::seed_from_u64(*seed)).collect();
        let mut streams: Vec<_> = shards.iter().map(|(r, _)| r.clone()).zip(rngs.iter_mut()).collect();
        return generate_with(model, engine, threads, prompts, std::slice::from_ref(cfg), eos, pad, &mut streams);
    }
    let decode = |m: &Qwen2<B>, (range, seed): (Range<usize>, u64)| {
        let len = range.len();
        generate_with(m, None, 1, &prompts[range], std::slice::from_ref(cfg), eos, pad, &mut [(0..len, &mut ChaCha8Rng::seed_from_u64(seed))])
    };
    on_threads(model, shards, decode).into_iter().flatten().collect()
}

/// `f(model, shard)` for each shard on its own thread (each with its own copy of the model
/// handle), results in shard order; a panic on a thread is raised here.
fn on_threads<B: FusedOps, S: Send, T: Send>(model: &Qwen2<B>, shards: Vec<S>, f: impl Fn(&Qwen2<B>, S) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .into_iter()
            .map(|shard| {
                let (m, f) = (model.clone(), &f);
                scope.spawn(move || f(&m, shard))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// Logits of the last position of every row, on the host: `[batch, T, V]` → `[batch * V]`.
fn last_logits<B: FusedOps>(logits: burn::tensor::Tensor<B, 3>, vocab: usize) -> Vec<f32> {
    let [b, t, _] = logits.dims();
    let last = logits.slice([0..b, t - 1..t, 0..vocab]);
    last.into_data().convert::<f32>().to_vec::<f32>().expect("f32 logits")
}

/// Indices of `values` from the largest to the smallest (`f32::total_cmp` order, ties by index),
/// by sorting plain `u64` keys: the same order as sorting indices with that comparator, without
/// its indirect loads (the sort was 4% of a decoding step over a 2,048-token vocabulary).
fn descending_order(values: &[f32]) -> Vec<usize> {
    let mut keys: Vec<u64> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // total_cmp's own transform: an i32 whose order is total_cmp's, then as u32
            let bits = v.to_bits() as i32;
            let ordered = (bits ^ ((((bits >> 31) as u32) >> 1) as i32)) as u32 ^ 0x8000_0000;
            (u64::from(!ordered) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| (k & 0xffff_ffff) as usize).collect()
}

/// Draws one token from `logits` `[V]`; returns it and its log-probability under
/// softmax(logits / T) (under softmax(logits) for greedy decoding).
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let t = if cfg.temperature > 0.0 { cfg.temperature } else { 1.0 };
    let scaled: Vec<f32> = logits.iter().map(|l| l / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scaled.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let log_z = max + sum.ln();
    let logprob = |i: usize| scaled[i] - log_z;
    if cfg.temperature == 0.0 {
        let best = argmax(&scaled);
        return (best as u32, logprob(best));
    }
    if cfg.top_k == 0 && cfg.top_p >= 1.0 {
        // nothing cut: draw in vocabulary order, no sort
        let mut u = rng.random::<f32>() * sum;
        let mut last = argmax(&scaled);
        for (i, e) in exps.iter().enumerate().filter(|(_, e)| **e > 0.0) {
            u -= e;
            last = i;
            if u <= 0.0 {
                break;
            }
        }
        return (last as u32, logprob(last));
    }
    // candidates sorted by probability, cut by top-k then top-p
    let mut order = descending_order(&scaled);
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k);
    }
    let probs: Vec<f32> = order.iter().map(|&i| logprob(i).exp()).collect();
    let mut keep = probs.len();
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let total: f32 = probs[..keep].iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (n, p) in probs[..keep].iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return (order[n] as u32, logprob(order[n]));
        }
    }
    let last = order[keep - 1];
    (last as u32, logprob(last))
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, v)| if *v > x[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_set_is_the_models_eos_ids_and_the_tokenizers() {
        let tok = t1_data::train_bpe(&["0123456789".to_string()], 259).unwrap();
        let eos = tok.eos_id();
        let mut config = Qwen2Config::tiny(300, 16, 1, 2, 1);
        config.eos_token_id = Some(serde_json::json!([eos + 1, eos + 2]));
        assert_eq!(stop_ids(&config, &tok), vec![eos + 1, eos + 2, eos]);
        config.eos_token_id = Some(serde_json::json!(eos));
        assert_eq!(stop_ids(&config, &tok), vec![eos], "no id twice");
        config.eos_token_id = None;
        assert_eq!(stop_ids(&config, &tok), vec![eos]);
    }

    #[test]
    fn descending_order_is_the_total_cmp_order_with_ties_by_index() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let special = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MIN_POSITIVE, -1e-40, 1.0];
        for case in 0..200 {
            let n = 1 + case % 37;
            let values: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..4) {
                    0 => special[rng.random_range(0..special.len())],
                    1 => rng.random_range(-3..3) as f32, // ties
                    _ => rng.random::<f32>() * 20.0 - 10.0,
                })
                .collect();
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
            assert_eq!(descending_order(&values), want, "{values:?}");
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (tok, lp) = sample(&[0.0, 3f32.ln()], &SamplingConfig::greedy(1), &mut rng);
        assert_eq!(tok, 1);
        assert!((lp - 0.75f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_frequencies_follow_the_temperature() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cfg = SamplingConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        assert!((0..50).all(|_| sample(&[0.0, 1.0, 0.5], &cfg, &mut rng).0 == 1));
        // p = [1/4, 3/4] at T = 1; at T = 2 logits halve
        let cfg = SamplingConfig { temperature: 2.0, ..Default::default() };
        let logits = [0.0, 2.0 * 3f32.ln()];
        let n = 20000;
        let ones = (0..n).filter(|_| sample(&logits, &cfg, &mut rng).0 == 1).count();
        assert!((ones as f32 / n as f32 - 0.75).abs() < 0.02, "{ones}");
        // nothing cut (the unsorted path): p = [0.1, 0.2, 0.3, 0.4], logprobs log p
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln() + 5.0).collect();
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let (tok, lp) = sample(&logits, &SamplingConfig::default(), &mut rng);
            counts[tok as usize] += 1;
            assert!((lp - ((tok + 1) as f32 / 10.0).ln()).abs() < 1e-5, "token {tok}: logprob {lp}");
        }
        for (i, c) in counts.iter().enumerate() {
            assert!((*c as f32 / n as f32 - (i + 1) as f32 / 10.0).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // p ≈ [0.665, 0.245, 0.09]: top_p 0.6 keeps only the first
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.6, ..Default::default() };
        assert!((0..200).all(|_| sample(&[2.0, 1.0, 0.0], &cfg, &mut rng).0 == 0));
    }
}
