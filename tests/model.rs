//! The Qwen2 model against transformers, the KV cache, padding, and HF checkpoint round trips.

use t1_cpu::HostEngine;
use t1_model::{hf, BurnDecoder, Decoder, FusedOps, Inputs, KvCache, Qwen2, Qwen2Config, SaveOptions, WeightDtype};

use crate::common::*;

/// f32's unit roundoff: 24 significant bits, so one rounding moves a value by at most 2^-24 of it.
pub(crate) const F32_ROUNDOFF: f32 = 1.0 / (1u32 << 24) as f32;
/// bf16's: 8 significant bits, 2^-9.
pub(crate) const BF16_ROUNDOFF: f32 = 1.0 / 512.0;

/// The longest chain of f32 sums one logit goes through: per layer a projection over
/// `hidden_size` (q/k/v, gate/up) and `down_proj` over `intermediate_size`, then the head over
/// `hidden_size`.
fn reduction_chain(config: &Qwen2Config) -> usize {
    config.num_hidden_layers * (config.hidden_size + config.intermediate_size) + config.hidden_size
}

/// Bound on |t1 − transformers| for logits both computed in f32 from the same weights, whose
/// largest |logit| is `scale`. The two sum in different orders (blocked gemm, fused kernels);
/// a sum of n terms rounded in any order is within n·2^-24 of the sum of |terms| (Higham's
/// γ_n), and RMSNorm keeps those sums of the order of the logits. Measured on the fixtures:
/// 4–9 roundoffs × scale (padded batch included), against the bound's 136–504.
pub(crate) fn f32_logit_bound(config: &Qwen2Config, scale: f32) -> f32 {
    reduction_chain(config) as f32 * F32_ROUNDOFF * scale
}

/// Bound on |t1 in bf16 − transformers in f32| for the same (bf16) weights, whose largest
/// |logit| is `scale`. burn-flex's bf16 ops accumulate in f32 and round their output once to
/// bf16 (2^-9), so what counts is the number of roundings along one position's path: per layer
/// 17 (input norm; q, k, v; RoPE of q and k; scores; softmax; probs × v; o_proj; residual add;
/// post-attention norm; gate; up; SwiGLU; down; residual add), then the final norm and the head.
/// Each moves the logits by at most 2^-9 of their scale (the norms keep the gain ≈ 1).
/// Measured on qwen2-bf16: 3.9 roundoffs × scale, against the bound's 19.
pub(crate) fn bf16_logit_bound(config: &Qwen2Config, scale: f32) -> f32 {
    (17 * config.num_hidden_layers + 2) as f32 * BF16_ROUNDOFF * scale
}

/// Logits of every fixture checkpoint against transformers' (float32), on backend `B`.
fn check_reference_logits<B: FusedOps>(device: &B::Device) {
    for name in CHECKPOINTS {
        let r = reference(name);
        let (config, model) = t1_model::load::<B>(&fixture(name), WeightDtype::F32, device).unwrap();
        let logits = to_vec(model.forward(&Inputs::dense(r.batch, r.len, r.ids.clone()), None));
        let diff = max_abs_diff(&logits, &r.logits);
        let bound = f32_logit_bound(&config, max_abs(&r.logits));
        println!("{name}: max |logit diff| vs transformers = {diff:.3e} (bound {bound:.3e})");
        assert!(diff <= bound, "{name}: max |logit diff| {diff:.3e} > {bound:.3e}");
    }
}

/// `padded.safetensors` of a fixture (tests/fixtures/make_qwen2.py): a batch with left- and
/// right-padded rows, its attention mask and transformers' logits.
struct Padded {
    batch: usize,
    len: usize,
    ids: Vec<i64>,
    mask: Vec<bool>,
    logits: Vec<f32>,
}

fn padded_reference(name: &str) -> Padded {
    let bytes = std::fs::read(fixture(name).join("padded.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |n: &str| st.tensor(n).unwrap();
    let shape = tensor("input_ids").shape().to_vec();
    let mask = i64s(&tensor("attention_mask")).into_iter().map(|m| m == 1).collect();
    Padded { batch: shape[0], len: shape[1], ids: i64s(&tensor("input_ids")), mask, logits: f32s(&tensor("logits")) }
}

/// The logits of the real tokens of a left- and right-padded batch (random pad ids, attention
/// mask) against transformers', which was given the mask and positions `cumsum(mask) - 1`.
#[test]
fn padded_batch_matches_transformers_on_real_tokens() {
    let device = Default::default();
    for name in CHECKPOINTS {
        let p = padded_reference(name);
        let (config, model) = t1_model::load::<FlexInner>(&fixture(name), WeightDtype::F32, &device).unwrap();
        assert!(p.mask.contains(&false) && p.mask[..p.len].iter().all(|&m| m), "{name}: the fixture should hold pads and a full row");
        let logits = to_vec(model.forward(&Inputs::new(p.batch, p.len, p.ids.clone(), p.mask.clone()), None));
        let vocab = model.vocab_size();
        let real = |all: &[f32]| -> Vec<f32> {
            (0..p.batch * p.len).filter(|&k| p.mask[k]).flat_map(|k| all[k * vocab..(k + 1) * vocab].to_vec()).collect()
        };
        let want = real(&p.logits);
        let diff = max_abs_diff(&real(&logits), &want);
        let bound = f32_logit_bound(&config, max_abs(&want));
        println!("{name}: padded batch, max |logit diff| of real tokens vs transformers = {diff:.3e} (bound {bound:.3e})");
        assert!(diff <= bound, "{name}: padded batch, max |logit diff| {diff:.3e} > {bound:.3e}");
    }
}

#[test]
fn logits_match_transformers_on_flex() {
    check_reference_logits::<FlexInner>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn logits_match_transformers_on_wgpu() {
    // the backend `--device wgpu` runs (without burn-fusion; see t1-backends)
    check_reference_logits::<<t1_backends::WgpuBackend as burn::tensor::backend::AutodiffBackend>::InnerBackend>(&Default::default());
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let r = reference("qwen2-gqa");
    let device = Default::default();
    let (_, model) = t1_model::load::<FlexInner>(&fixture("qwen2-gqa"), WeightDtype::F32, &device).unwrap();
    // through burn, and on the CPU engine where this CPU has AVX-512
    let engine = HostEngine::new(&model);
    println!("CPU decoding engine: {}", engine.is_some());
    for engine in [None, engine] {
        check_cached_decoding(&model, &r, engine);
    }
}

pub(crate) fn check_cached_decoding(model: &Qwen2<FlexInner>, r: &Reference, engine: Option<HostEngine>) {
    let (b, t) = (r.batch, r.len);
    let full = to_vec(model.forward(&Inputs::dense(b, t, r.ids.clone()), None));
    let vocab = model.vocab_size();
    // prefill 3 tokens, then one token at a time
    let prefill = 3;
    let mut cache = KvCache::new(model.num_layers());
    let first: Vec<i64> = (0..b).flat_map(|row| r.ids[row * t..row * t + prefill].to_vec()).collect();
    let out = to_vec(model.forward(&Inputs::dense(b, prefill, first), Some(&mut cache)));
    for row in 0..b {
        for i in 0..prefill {
            let got = &out[(row * prefill + i) * vocab..][..vocab];
            let want = &full[(row * t + i) * vocab..][..vocab];
            assert!(max_abs_diff(got, want) < 1e-5);
        }
    }
    let mut decoder: Box<dyn Decoder> = match engine {
        Some(engine) => Box::new(engine.decoder(cache, b, 1)),
        None => Box::new(BurnDecoder { model, cache }),
    };
    for step in prefill..t {
        let ids: Vec<i64> = (0..b).map(|row| r.ids[row * t + step]).collect();
        let inputs = Inputs::step(ids, vec![step as i64; b], vec![true; b * (step + 1)]);
        let out = decoder.step(&inputs);
        for row in 0..b {
            let want = &full[(row * t + step) * vocab..][..vocab];
            let diff = max_abs_diff(&out[row * vocab..][..vocab], want);
            assert!(diff < 1e-5, "step {step} row {row}: {diff}");
        }
    }
    assert_eq!(decoder.len(), t);
}

/// The CPU engine (`t1-cpu`) against decoding through burn's tensors, on a left-padded batch
/// with a sequence that stops (its new keys masked), past the host cache's first capacity (64),
/// on 1–3 threads, and back to a multi-token call through burn after host steps. Both
/// checkpoints: one with an `lm_head`, one tied.
#[test]
#[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
fn avx512_host_decoding_matches_decoding_through_burn() {
    let device = Default::default();
    for name in ["qwen2-gqa", "qwen2-tied"] {
        let (_, model) = t1_model::load::<FlexInner>(&fixture(name), WeightDtype::F32, &device).unwrap();
        let engine = HostEngine::new(&model).expect("asked to test host decoding on a CPU without AVX-512F");
        let (b, width, steps, vocab) = (3, 5, 80, model.vocab_size());
        // row 0 full, row 1 two pads, row 2 four pads
        let pads = [0, 2, 4];
        let mask: Vec<bool> = pads.iter().flat_map(|&p| (0..width).map(move |i| i >= p)).collect();
        let id = |row: usize, i: usize| ((row * 31 + i * 7) % (vocab - 1) + 1) as i64;
        let ids: Vec<i64> = (0..b).flat_map(|row| (0..width).map(move |i| id(row, i))).collect();
        let decode = |engine: Option<&HostEngine>, threads: usize| {
            let mut cache = KvCache::new(model.num_layers());
            let mut out = vec![to_vec(model.forward(&Inputs::new(b, width, ids.clone(), mask.clone()), Some(&mut cache)))];
            let mut key_mask = mask.clone();
            let mut pos: Vec<i64> = pads.iter().map(|p| (width - p) as i64).collect();
            let mut run = |decoder: &mut dyn Decoder| {
                for step in 0..steps {
                    // row 2 stops after 10 tokens: pad ids, masked keys
                    let live = |row: usize| row != 2 || step < 10;
                    let step_ids: Vec<i64> = (0..b).map(|row| if live(row) { id(row, width + step) } else { 0 }).collect();
                    let s = width + step;
                    key_mask = (0..b).flat_map(|row| key_mask[row * s..(row + 1) * s].iter().copied().chain([live(row)])).collect();
                    out.push(decoder.step(&Inputs::step(step_ids, pos.clone(), key_mask.clone())));
                    pos.iter_mut().for_each(|p| *p += 1);
                }
            };
            let mut cache = match engine {
                Some(engine) => {
                    let mut decoder = engine.decoder(cache, b, threads);
                    run(&mut decoder);
                    decoder.into_cache(&device)
                }
                None => {
                    let mut decoder = BurnDecoder { model: &model, cache };
                    run(&mut decoder);
                    decoder.cache
                }
            };
            // two tokens at once: through burn's tensors again, from the host cache
            let s = width + steps;
            let ids2: Vec<i64> = (0..b * 2).map(|i| id(i, 3)).collect();
            let mask2: Vec<bool> = (0..b).flat_map(|row| key_mask[row * s..(row + 1) * s].iter().copied().chain([true, true])).collect();
            let positions: Vec<i64> = pos.iter().flat_map(|&p| [p, p + 1]).collect();
            let inputs = Inputs { batch: b, len: 2, past: s, ids: ids2, positions, key_mask: mask2, segments: None };
            out.push(to_vec(model.forward(&inputs, Some(&mut cache))));
            assert_eq!(cache.len(), s + 2);
            out
        };
        let burn = decode(None, 1);
        for threads in [1, 2, 3] {
            let host = decode(Some(&engine), threads);
            for (step, (h, r)) in host.iter().zip(&burn).enumerate() {
                let diff = max_abs_diff(h, r);
                assert!(diff < 1e-5, "{name}, {threads} threads, call {step}: max |logit diff| {diff}");
            }
        }
    }
}

/// A bf16 model decodes on the host with its projections kept in bf16 and f32 activations: the
/// logits of the same weights held in f32 and decoded through burn, step by step from an empty
/// cache.
#[test]
#[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
fn avx512_host_decoding_of_a_bf16_model_computes_in_f32_from_its_bf16_weights() {
    let device = Default::default();
    let (_, bf16) = t1_model::load::<FlexInner>(&fixture("qwen2-bf16"), WeightDtype::Bf16, &device).unwrap();
    let (_, f32_model) = t1_model::load::<FlexInner>(&fixture("qwen2-bf16"), WeightDtype::F32, &device).unwrap();
    let engine = HostEngine::new(&bf16).expect("asked to test host decoding on a CPU without AVX-512F");
    let (b, steps, vocab) = (2, 12, bf16.vocab_size());
    let mut host = engine.decoder(KvCache::<FlexInner>::new(bf16.num_layers()), b, 2);
    let mut reference = KvCache::new(f32_model.num_layers());
    for step in 0..steps {
        let ids: Vec<i64> = (0..b).map(|row| ((row * 17 + step * 5) % (vocab - 1) + 1) as i64).collect();
        let inputs = Inputs::step(ids, vec![step as i64; b], vec![true; b * (step + 1)]);
        let got = host.step(&inputs);
        let diff = max_abs_diff(&got, &to_vec(f32_model.forward(&inputs, Some(&mut reference))));
        assert!(diff < 1e-5, "step {step}: max |logit diff| {diff}");
    }
    // back to burn (two tokens at once): the cache returns in the model's dtype
    let s = steps;
    let mut cache = host.into_cache::<FlexInner>(&device);
    let inputs = Inputs { batch: b, len: 2, past: s, ids: vec![3; 2 * b], positions: (0..b).flat_map(|_| [s as i64, s as i64 + 1]).collect(), key_mask: vec![true; b * (s + 2)], segments: None };
    assert_eq!(bf16.forward(&inputs, Some(&mut cache)).dims(), [b, 2, vocab]);
}

/// `generate_sharded` on the host decodes the whole batch at once, each shard's rows drawn from
/// the shard's stream: the same tokens as decoding each shard on its own with that stream.
#[test]
#[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
fn avx512_sharded_host_decoding_draws_the_tokens_of_separate_shards() {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    let device = Default::default();
    let (_, model) = t1_model::load::<FlexInner>(&fixture("qwen2-gqa"), WeightDtype::F32, &device).unwrap();
    assert!(HostEngine::new(&model).is_some(), "asked to test host decoding on a CPU without AVX-512F");
    let vocab = model.vocab_size() as u32;
    let prompts: Vec<Vec<u32>> = (0..7u32).map(|i| (0..3 + i % 4).map(|j| (i * 13 + j * 5) % (vocab - 1) + 1).collect()).collect();
    let cfg = t1_train::SamplingConfig { temperature: 1.0, top_p: 0.95, top_k: 0, max_new_tokens: 24 };
    // a tenth of the vocabulary ends a sequence: most stop early, at different steps
    let eos: Vec<u32> = (1..vocab).step_by(10).collect();
    for threads in [2, 3] {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let together = t1_train::generate_sharded(&model, &prompts, &cfg, &eos, 0, &mut rng.clone(), threads);
        let mut alone = vec![];
        for shard in t1_train::parallel::split_even(prompts.len(), threads) {
            let seed = rng.random::<u64>();
            alone.extend(t1_train::generate(&model, &prompts[shard], &cfg, &eos, 0, &mut ChaCha8Rng::seed_from_u64(seed)));
        }
        assert_eq!(together.len(), alone.len());
        assert!(together.iter().any(|r| !r.truncated), "some sequence should stop at EOS");
        for (row, (t, a)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(t.tokens, a.tokens, "{threads} threads, row {row}");
            assert_eq!(t.truncated, a.truncated);
            assert!(max_abs_diff(&t.logprobs, &a.logprobs) < 1e-5, "{threads} threads, row {row}");
        }
    }
}

#[test]
fn padding_does_not_change_the_logits_of_real_tokens() {
    let device = Default::default();
    for name in ["qwen2-gqa", "qwen2-tied"] {
        let r = reference(name);
        let (config, model) = t1_model::load::<FlexInner>(&fixture(name), WeightDtype::F32, &device).unwrap();
        let vocab = model.vocab_size();
        let t = r.len;
        let row0: Vec<i64> = r.ids[..t].to_vec();
        let short: Vec<i64> = r.ids[t..t + 4].to_vec(); // a shorter second sequence
        let alone = to_vec(model.forward(&Inputs::dense(1, 4, short.clone()), None));
        let pad = 0i64;
        for left in [true, false] {
            let mut ids = row0.clone();
            let mut mask = vec![true; t];
            let padding = vec![pad; t - 4];
            let (row1, mask1): (Vec<i64>, Vec<bool>) = if left {
                (padding.iter().chain(&short).copied().collect(), (0..t).map(|i| i >= t - 4).collect())
            } else {
                (short.iter().chain(&padding).copied().collect(), (0..t).map(|i| i < 4).collect())
            };
            ids.extend(row1);
            mask.extend(mask1);
            let out = to_vec(model.forward(&Inputs::new(2, t, ids, mask), None));
            let full = &r.logits[..t * vocab];
            let (diff, bound) = (max_abs_diff(&out[..t * vocab], full), f32_logit_bound(&config, max_abs(full)));
            assert!(diff <= bound, "{name}: unpadded row changed: {diff:.3e} from transformers' > {bound:.3e}");
            let offset = if left { t - 4 } else { 0 };
            let got = &out[(t + offset) * vocab..(t + offset + 4) * vocab];
            let diff = max_abs_diff(got, &alone);
            println!("{name} left={left}: padding moved the real logits by {diff:.3e}");
            assert!(diff < 1e-5, "{name} left={left}: padding changed real logits by {diff}");
        }
    }
}

fn assert_same_weights<B: FusedOps>(a: &Qwen2<B>, b: &Qwen2<B>) {
    let (ta, tb) = (hf::named_tensors(a), hf::named_tensors(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, da), (nb, db)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert_eq!(da.as_bytes(), db.as_bytes(), "{na} changed in the round trip");
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    let device = Default::default();
    for name in CHECKPOINTS {
        let (config, model) = t1_model::load::<FlexInner>(&fixture(name), WeightDtype::F32, &device).unwrap();
        for max_shard_bytes in [usize::MAX, 20_000] {
            let dir = tempfile::tempdir().unwrap();
            t1_model::save(&model, &config, dir.path(), &SaveOptions { dtype: None, max_shard_bytes }).unwrap();
            let sharded = dir.path().join(hf::INDEX_FILE).exists();
            assert_eq!(sharded, max_shard_bytes == 20_000, "{name}: sharding");
            let (config2, model2) = t1_model::load::<FlexInner>(dir.path(), WeightDtype::F32, &device).unwrap();
            assert_eq!(config2.tie_word_embeddings, config.tie_word_embeddings);
            assert_same_weights(&model, &model2);
        }
    }
}

#[test]
fn bf16_files_round_trip_exactly_and_compute_in_bf16() {
    let device = Default::default();
    let (config, model) = t1_model::load::<FlexInner>(&fixture("qwen2-bf16"), WeightDtype::Bf16, &device).unwrap();
    assert_eq!(model.dtype(), burn::tensor::DType::BF16);
    let dir = tempfile::tempdir().unwrap();
    t1_model::save(&model, &config, dir.path(), &SaveOptions::default()).unwrap();
    let original = std::fs::read(fixture("qwen2-bf16").join("model.safetensors")).unwrap();
    let saved = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let (a, b) = (safetensors::SafeTensors::deserialize(&original).unwrap(), safetensors::SafeTensors::deserialize(&saved).unwrap());
    for (name, view) in a.tensors() {
        assert_eq!(view.data(), b.tensor(&name).unwrap().data(), "{name} changed");
    }
    let r = reference("qwen2-bf16");
    let logits = to_vec(model.forward(&Inputs::dense(r.batch, r.len, r.ids.clone()), None));
    let diff = max_abs_diff(&logits, &r.logits);
    let bound = bf16_logit_bound(&config, max_abs(&r.logits));
    println!("bf16 compute: max |logit diff| vs transformers f32 = {diff:.3e} (bound {bound:.3e})");
    assert!(diff <= bound, "bf16 logits too far from the f32 reference: {diff:.3e} > {bound:.3e}");
}

/// Copies a fixture into a temporary directory so a test can break it.
pub(crate) fn broken_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(dir: &std::path::Path) -> String {
    t1_model::load::<FlexInner>(dir, WeightDtype::F32, &Default::default()).unwrap_err().to_string()
}

#[test]
fn a_config_that_does_not_match_the_weights_names_the_keys() {
    // one layer more in the config than in the file: the missing keys are named
    let dir = broken_copy("qwen2-gqa");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["num_hidden_layers"] = 3.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("missing tensors: model.layers.2."), "{err}");

    // one layer fewer: the unused keys are named
    json["num_hidden_layers"] = 1.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("not used") && err.contains("model.layers.1."), "{err}");

    // wrong width: the shapes are named
    json["num_hidden_layers"] = 2.into();
    json["intermediate_size"] = 70.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("mlp.gate_proj.weight has shape [72, 32], config.json implies [70, 32]"), "{err}");

    // another architecture
    json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    json["model_type"] = "llama".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("Qwen2ForCausalLM"), "{err}");
}

#[test]
fn corrupt_or_missing_weights_are_clear_errors() {
    let dir = broken_copy("qwen2-tied");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("corrupt checkpoint file") && err.contains("model.safetensors"), "{err}");
    // absurd header length
    let mut evil = u64::MAX.to_le_bytes().to_vec();
    evil.extend_from_slice(b"{}");
    std::fs::write(&weights, evil).unwrap();
    assert!(load_error(dir.path()).contains("corrupt checkpoint file"));
    std::fs::remove_file(&weights).unwrap();
    assert!(load_error(dir.path()).contains("no weights in"));
}

/// Gradients of the LM loss match PyTorch's (tests/fixtures/make_grads.py) for every parameter:
/// embedding, GQA q/k/v through RoPE and the kv repeat, o_proj, MLP, norms, untied head.
#[test]
fn gradients_match_pytorch() {
    check_gradients("qwen2-gqa");
}

/// With tied embeddings the embedding's gradient is the sum of its two uses, as input embedding
/// and as output head: PyTorch's (one shared parameter) against t1's (no `lm_head`, the head
/// reads `embed_tokens`).
#[test]
fn tied_embedding_gradient_matches_pytorch() {
    check_gradients("qwen2-tied");
}

/// Gradients of the mean next-token NLL over the fixture's reference ids against PyTorch's
/// `grads.safetensors`, each parameter within a bound relative to its largest |gradient|: the
/// backward pass runs the forward chain of sums ([`reduction_chain`]) back again, and the
/// weight gradients add over the batch × len tokens and the softmax over the vocabulary, so
/// n = 2·chain + tokens + vocab roundoffs of f32.
fn check_gradients(name: &str) {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Int, Tensor, TensorData};
    let device = Default::default();
    let (config, model) = t1_model::load::<Flex>(&fixture(name), WeightDtype::F32, &device).unwrap();
    let r = reference(name);
    let (b, t) = (r.batch, r.len - 1);
    let ids: Vec<i64> = (0..b).flat_map(|row| r.ids[row * r.len..row * r.len + t].to_vec()).collect();
    let targets: Vec<i64> = (0..b).flat_map(|row| r.ids[row * r.len + 1..(row + 1) * r.len].to_vec()).collect();
    let logits = model.forward(&Inputs::dense(b, t, ids), None);
    let logit_scale = max_abs(&to_vec(logits.clone()));
    let tg = Tensor::<Flex, 2, Int>::from_data(TensorData::new(targets, [b, t]), &device);
    let loss = t1_algo::token_logprobs(logits, tg).mean().neg();
    let loss_value = to_vec(loss.clone())[0];
    let grads = loss.backward();

    struct Collect<'a>(&'a <Flex as burn::tensor::backend::AutodiffBackend>::Gradients, Vec<Vec<f32>>);
    impl ModuleVisitor<Flex> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Flex, D>>) {
            self.1.push(p.val().grad(self.0).map(to_vec).unwrap_or_default());
        }
    }
    let mut c = Collect(&grads, vec![]);
    model.visit(&mut c);
    // module order is the HF order of hf::expected_tensors (no lm_head.weight when tied)
    let names: Vec<(String, Vec<usize>)> = hf::expected_tensors(&config);
    assert_eq!(names.len(), c.1.len());
    let bytes = std::fs::read(fixture(name).join("grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let named = |n: &str| -> Vec<f32> { f32s(&st.tensor(n).unwrap()) };
    assert_eq!(st.names().len(), names.len() + 1, "{name}: grads.safetensors holds the loss and one gradient per parameter");
    // the loss is a mean of log-softmax values, each within 2 × the logits' error of PyTorch's,
    // plus the roundings of the log-sum-exp over the vocabulary
    let want_loss = named("loss")[0];
    let loss_bound = 2.0 * f32_logit_bound(&config, logit_scale) + config.vocab_size as f32 * F32_ROUNDOFF * want_loss.abs();
    let loss_diff = max_abs_diff(&[loss_value], &[want_loss]);
    println!("{name}: loss {loss_value} vs PyTorch {want_loss}: {loss_diff:.3e} (bound {loss_bound:.3e})");
    assert!(loss_diff <= loss_bound, "{name}: loss {loss_value} vs {want_loss}: {loss_diff:.3e} > {loss_bound:.3e}");
    let n = 2 * reduction_chain(&config) + b * t + config.vocab_size;
    let relative_bound = n as f32 * F32_ROUNDOFF;
    let mut worst = (0f32, String::new());
    for ((param, hf_shape), g) in names.iter().zip(&c.1) {
        let want = named(param);
        // burn Linear weights are [in, out]: transpose to HF [out, in]
        let is_linear = param.ends_with("proj.weight") || param == "lm_head.weight";
        let got: Vec<f32> = if is_linear {
            let (o, i) = (hf_shape[0], hf_shape[1]);
            (0..o * i).map(|k| g[(k % i) * o + k / i]).collect()
        } else {
            g.clone()
        };
        let scale = max_abs(&want);
        assert!(scale > 0.0, "{name}: {param} has an all-zero reference gradient");
        let rel = max_rel_diff(&want, &got, f32::MIN_POSITIVE);
        assert!(rel <= relative_bound, "{name}: {param}: max |grad diff| / max |grad| = {rel:.3e} > {relative_bound:.3e} (scale {scale:.3e})");
        if rel >= worst.0 {
            worst = (rel, param.clone());
        }
    }
    println!("{name}: gradients vs PyTorch: worst max |diff| / max |grad| = {:.3e} ({}; bound {relative_bound:.3e})", worst.0, worst.1);
}

/// RMSNorm's CubeCL kernels (`t1-ops`, the path of the wgpu and CUDA backends) against burn's
/// composition on the same device: values, the hand-written backward, and the gradients through
/// `Autodiff<Wgpu>` against burn's `RmsNorm` module differentiated by burn. A row count that is
/// not a multiple of a cube's units, a hidden size that is not a power of two, and a strided
/// (transposed) input.
#[cfg(feature = "wgpu")]
#[test]
fn cubecl_rms_norm_matches_burns_composition_on_wgpu() {
    use burn::tensor::{Tensor, TensorData};
    type Ad = t1_backends::WgpuBackend;
    type W = <Ad as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let device = Default::default();
    let (rows, t, n) = (3, 37, 40);
    let values = |len: usize, seed: u64, std: f32| -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * std
            })
            .collect()
    };
    let tensor = |v: Vec<f32>, shape: [usize; 3]| Tensor::<W, 3>::from_data(TensorData::new(v, shape), &device);
    let x = tensor(values(rows * t * n, 1, 3.0), [rows, t, n]);
    let gamma = Tensor::<W, 1>::from_data(TensorData::new(values(n, 2, 1.0), [n]), &device);
    let d_y = tensor(values(rows * t * n, 3, 1.0), [rows, t, n]);
    let eps = 1e-6;
    let close = |got: Vec<f32>, want: Vec<f32>, what: &str| {
        // relative to the largest entry: a few f32 ulps of 40-term sums
        let diff = max_rel_diff(&got, &want, 1e-6);
        assert!(diff < 1e-5, "{what}: max difference relative to the largest entry {diff}");
    };
    close(to_vec(W::rms_norm(x.clone(), gamma.clone(), eps)), to_vec(t1_ops::compose::rms_norm(x.clone(), gamma.clone(), eps)), "values");
    let (d_x, d_gamma) = W::rms_norm_backward(x.clone(), gamma.clone(), eps, d_y.clone());
    let (want_x, want_gamma) = t1_ops::compose::rms_norm_backward(x.clone(), gamma.clone(), eps, d_y.clone());
    close(to_vec(d_x), to_vec(want_x), "d_x");
    close(to_vec(d_gamma), to_vec(want_gamma), "d_gamma");
    // a strided input: the kernel makes it contiguous first
    let xt = tensor(values(rows * t * n, 4, 2.0), [t, rows, n]).swap_dims(0, 1);
    close(to_vec(W::rms_norm(xt.clone(), gamma.clone(), eps)), to_vec(t1_ops::compose::rms_norm(xt, gamma.clone(), eps)), "strided values");
    // through autodiff, against burn's own module and autodiff
    let mut norm = burn::nn::RmsNormConfig::new(n).with_epsilon(eps).init::<Ad>(&device);
    norm.gamma = burn::module::Param::from_tensor(Tensor::from_inner(gamma));
    let x = Tensor::<Ad, 3>::from_inner(x).require_grad();
    let w = Tensor::<Ad, 3>::from_inner(d_y);
    let grads_of = |y: Tensor<Ad, 3>| (y * w.clone()).sum().backward();
    let (fused, composed) = (grads_of(Ad::rms_norm(x.clone(), norm.gamma.val(), eps)), grads_of(norm.forward(x.clone())));
    close(to_vec(x.grad(&fused).unwrap()), to_vec(x.grad(&composed).unwrap()), "autodiff d_x");
    close(to_vec(norm.gamma.grad(&fused).unwrap()), to_vec(norm.gamma.grad(&composed).unwrap()), "autodiff d_gamma");
}
