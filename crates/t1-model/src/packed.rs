//! Host-side projections for decoding on the CPU.
//!
//! A decoding step multiplies a few rows (one per sequence) by every weight matrix: the work is
//! reading the weights. gemm repacks each weight panel on every call and its reads of the
//! unpacked `[in, out]` matrix stride across pages; on this project's 2-core machine that held a
//! step of 8 rows to ~5 GB/s of weights (~25 GFLOP/s). Here the weights are packed once per
//! `generate` call into column panels `[out / 32][in][32]` that are read front to back (with
//! software prefetch), and each panel is multiplied by up to 8 rows held in registers: 2× on
//! the projections of the 18M benchmark model (BENCHMARKS.md).
//!
//! Used only where tensors already live in host memory (burn-flex, f32) and only for calls of
//! at most [`MAX_ROWS`] rows; everything else goes through burn's matmul.

use std::sync::Arc;

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// Calls with more rows (prefill, training) use gemm. Measured on the 18M model, 2 threads:
/// 32 rows per thread 1,882 vs gemm's 1,652 tokens/s, 64 rows 2,015 vs 1,602.
pub(crate) const MAX_ROWS: usize = 64;
/// Output columns per panel: two AVX-512 registers.
const NT: usize = 32;
/// Rows multiplied together: 8 × 32 accumulators fit in 16 AVX-512 registers.
const MR: usize = 8;

/// One `Linear` (`y = x W + b`, `W` `[in, out]`) with `W` packed into column panels.
#[derive(Debug)]
pub(crate) struct PackedLinear {
    k: usize,
    n: usize,
    /// `[ceil(n / NT)][k][NT]`, zero past column `n`.
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs `w` (`[k, n]`, row-major).
    pub(crate) fn new(w: &[f32], k: usize, n: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), k * n, "weight of {} values is not [{k}, {n}]", w.len());
        if let Some(b) = &bias {
            assert_eq!(b.len(), n, "bias of {} values for {n} outputs", b.len());
        }
        let blocks = n.div_ceil(NT);
        let mut panels = vec![0.0; blocks * k * NT];
        for jb in 0..blocks {
            let cols = (n - jb * NT).min(NT);
            for kk in 0..k {
                let dst = (jb * k + kk) * NT;
                panels[dst..dst + cols].copy_from_slice(&w[kk * n + jb * NT..kk * n + jb * NT + cols]);
            }
        }
        Self { k, n, panels, bias }
    }

    fn from_linear<B: Backend>(linear: &Linear<B>) -> Self {
        let [k, n] = linear.weight.dims();
        let w = host(linear.weight.val());
        Self::new(&w, k, n, linear.bias.as_ref().map(|b| host(b.val())))
    }

    pub(crate) fn out_features(&self) -> usize {
        self.n
    }

    /// `x` `[batch, len, in]` → `[batch, len, out]` through [`Self::apply`], on the host.
    pub(crate) fn forward<B: Backend>(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let ([b, t, _], device) = (x.dims(), x.device());
        let y = TensorData::new(self.apply(&host(x), b * t), [b, t, self.out_features()]);
        Tensor::from_data(y, (&device, DType::F32))
    }

    /// `x` `[m, k]` (row-major) → `[m, n]`. Only on a CPU with AVX-512 ([`available`]).
    pub(crate) fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "input of {} values is not [{m}, {k}]", x.len());
        assert!(available(), "packed projections need AVX-512");
        let blocks = m.div_ceil(MR);
        // rows regrouped by MR and transposed, [blocks][k][MR], zero past row m: the MR values a
        // step broadcasts are adjacent
        let mut xt = vec![0.0f32; blocks * k * MR];
        for row in 0..m {
            let (b, r) = (row / MR, row % MR);
            for kk in 0..k {
                xt[(b * k + kk) * MR + r] = x[row * k + kk];
            }
        }
        let mut y = vec![0.0f32; m * n];
        let mut acc = [[0.0f32; NT]; MR];
        for (jb, panel) in self.panels.chunks_exact(k * NT).enumerate() {
            let cols = (n - jb * NT).min(NT);
            for b in 0..blocks {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available()` checked the CPU.
                unsafe {
                    avx512::panel_product(&xt[b * k * MR..(b + 1) * k * MR], panel, &mut acc)
                };
                for (r, acc_row) in acc.iter().enumerate().take((m - b * MR).min(MR)) {
                    let out = &mut y[(b * MR + r) * n + jb * NT..][..cols];
                    out.copy_from_slice(&acc_row[..cols]);
                    if let Some(bias) = &self.bias {
                        for (o, bv) in out.iter_mut().zip(&bias[jb * NT..jb * NT + cols]) {
                            *o += bv;
                        }
                    }
                }
            }
        }
        y
    }
}

/// Whether this CPU runs the packed projections (x86-64 with AVX-512F); elsewhere decoding
/// keeps using gemm.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NT};
    use std::arch::x86_64::*;

    /// `acc[r][c] = Σ_kk xt[kk][r] · panel[kk][c]`, summed in order of `kk` with fused
    /// multiply-adds; 8 rows × 32 columns in 16 registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_product(xt: &[f32], panel: &[f32], acc: &mut [[f32; NT]; MR]) {
        /// Panel rows fetched ahead (each 128 bytes).
        const AHEAD: usize = 64;
        let k = panel.len() / NT;
        assert!(xt.len() == k * MR && panel.len() == k * NT, "panel and rows disagree");
        let mut a = [_mm512_setzero_ps(); 2 * MR];
        let (mut xp, mut wp) = (xt.as_ptr(), panel.as_ptr());
        for kk in 0..k {
            if kk + AHEAD < k {
                _mm_prefetch::<_MM_HINT_T0>(wp.add(AHEAD * NT) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wp.add(AHEAD * NT + 16) as *const i8);
            }
            let w0 = _mm512_loadu_ps(wp);
            let w1 = _mm512_loadu_ps(wp.add(16));
            for r in 0..MR {
                let x = _mm512_set1_ps(*xp.add(r));
                a[2 * r] = _mm512_fmadd_ps(x, w0, a[2 * r]);
                a[2 * r + 1] = _mm512_fmadd_ps(x, w1, a[2 * r + 1]);
            }
            xp = xp.add(MR);
            wp = wp.add(NT);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            _mm512_storeu_ps(row.as_mut_ptr(), a[2 * r]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), a[2 * r + 1]);
        }
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// The projections of one decoder layer, packed.
#[derive(Debug)]
pub(crate) struct PackedLayer {
    pub q: PackedLinear,
    pub k: PackedLinear,
    pub v: PackedLinear,
    pub o: PackedLinear,
    pub gate: PackedLinear,
    pub up: PackedLinear,
    pub down: PackedLinear,
}

/// A model's projection weights packed for decoding on the CPU (see the module docs); made by
/// [`crate::Qwen2::decode_weights`], shared by the threads decoding one batch, and valid while
/// the model's weights do not change.
#[derive(Debug, Clone)]
pub struct DecodeWeights(pub(crate) Arc<Vec<PackedLayer>>);

impl<B: Backend> crate::Qwen2<B> {
    /// The projection weights packed for fast few-row products, when the model runs on the
    /// host (burn-flex) in f32 on a CPU with AVX-512; `None` elsewhere (GPU backends, bf16,
    /// other CPUs), where nothing changes.
    /// Give them to [`crate::KvCache::with_decode_weights`].
    pub fn decode_weights(&self) -> Option<DecodeWeights> {
        if B::name(&self.device()) != "flex" || self.dtype() != DType::F32 || !available() {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .map(|l| PackedLayer {
                q: PackedLinear::from_linear(&l.self_attn.q_proj),
                k: PackedLinear::from_linear(&l.self_attn.k_proj),
                v: PackedLinear::from_linear(&l.self_attn.v_proj),
                o: PackedLinear::from_linear(&l.self_attn.o_proj),
                gate: PackedLinear::from_linear(&l.mlp.gate_proj),
                up: PackedLinear::from_linear(&l.mlp.up_proj),
                down: PackedLinear::from_linear(&l.mlp.down_proj),
            })
            .collect();
        Some(DecodeWeights(Arc::new(layers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|kk| x[i * k + kk] as f64 * w[kk * n + j] as f64).sum();
                y[i * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    #[test]
    fn packed_products_match_a_naive_matmul() {
        let mut seed = 1u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // rows below, at and above one register block; columns below, at and past one panel
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 31), (3, 64, 32), (8, 96, 33), (9, 70, 65), (16, 128, 100), (5, 200, 3)] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            for b in [None, Some(bias.clone())] {
                let want = naive(&x, m, k, &w, n, b.as_deref());
                let packed = PackedLinear::new(&w, k, n, b);
                assert_eq!(packed.out_features(), n);
                if !available() {
                    eprintln!("no AVX-512 on this CPU: the packed projections are not used here");
                    return;
                }
                let got = packed.apply(&x, m);
                let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5 * (k as f32).sqrt().max(1.0), "m={m} k={k} n={n}: max error {err}");
            }
        }
    }
}
