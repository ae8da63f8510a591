//! Host-side projections for decoding on the CPU (`decode.rs`).
//!
//! A decoding step multiplies a few rows (one per sequence) by every weight matrix: the work is
//! reading the weights. gemm repacks each weight panel on every call and its reads of the
//! unpacked `[in, out]` matrix stride across pages; on this project's 2-core machine that held a
//! step of 8 rows to ~5 GB/s of weights (~25 GFLOP/s). Here the weights are packed once per
//! `generate` call into column panels `[out / 32][in][32]` that are read front to back (with
//! software prefetch), and each panel is multiplied by up to 8 rows held in registers: 2× on
//! the projections of the 18M benchmark model (BENCHMARKS.md).

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use t1_ops::kernels::available;

use crate::team::Team;

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
    panels: Panels,
    bias: Option<Vec<f32>>,
}

/// Weights as the model holds them: f32, or bf16 (bits), widened to f32 in the kernel — half
/// the bytes to read per step.
#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl PackedLinear {
    /// Packs `w` (`[k, n]`, row-major), as bf16 if `bf16` (exact for weights that are bf16).
    pub(crate) fn new(w: &[f32], k: usize, n: usize, bias: Option<Vec<f32>>, bf16: bool) -> Self {
        Self::from_blocks(&[w], k, n, bias, bf16)
    }

    /// Packs the column blocks `ws` (each `[k, nᵢ]`, row-major) side by side as one `[k, n]`
    /// weight, `n = Σ nᵢ`, reading each block once.
    fn from_blocks(ws: &[&[f32]], k: usize, n: usize, bias: Option<Vec<f32>>, bf16: bool) -> Self {
        assert_eq!(ws.iter().map(|w| w.len()).sum::<usize>(), k * n, "weights of {:?} values are not [{k}, {n}]", ws.iter().map(|w| w.len()).collect::<Vec<_>>());
        if let Some(b) = &bias {
            assert_eq!(b.len(), n, "bias of {} values for {n} outputs", b.len());
        }
        let mut panels = vec![0.0; n.div_ceil(NT) * k * NT];
        let mut first = 0; // the block's first column in the whole weight
        for w in ws {
            let width = w.len() / k;
            for (kk, row) in w.chunks_exact(width).enumerate() {
                // the row's columns first.., cut where the panels of NT columns are
                let mut done = 0;
                while done < width {
                    let (panel, lane) = ((first + done) / NT, (first + done) % NT);
                    let take = (NT - lane).min(width - done);
                    let dst = (panel * k + kk) * NT + lane;
                    panels[dst..dst + take].copy_from_slice(&row[done..done + take]);
                    done += take;
                }
            }
            first += width;
        }
        let panels = if bf16 { Panels::Bf16(panels.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect()) } else { Panels::F32(panels) };
        Self { k, n, panels, bias }
    }

    #[cfg(test)]
    fn f32_panels(&self) -> &[f32] {
        match &self.panels {
            Panels::F32(p) => p,
            Panels::Bf16(_) => panic!("bf16 panels"),
        }
    }

    pub(crate) fn from_linear<B: Backend>(linear: &Linear<B>, bf16: bool) -> Self {
        Self::concat(&[linear], bf16)
    }

    /// The `Linear`s of one input side by side (`[in, out₁ + out₂ + …]`): one product for
    /// q/k/v, one for gate/up. A missing bias counts as zeros.
    pub(crate) fn concat<B: Backend>(linears: &[&Linear<B>], bf16: bool) -> Self {
        let k = linears[0].weight.dims()[0];
        let n: usize = linears.iter().map(|l| l.weight.dims()[1]).sum();
        let data: Vec<TensorData> = linears
            .iter()
            .map(|l| {
                assert_eq!(l.weight.dims()[0], k, "concatenated projections must share their input");
                l.weight.val().into_data().convert::<f32>()
            })
            .collect();
        let ws: Vec<&[f32]> = data.iter().map(|d| d.as_slice::<f32>().expect("f32 data")).collect();
        let bias = linears.iter().any(|l| l.bias.is_some()).then(|| {
            linears.iter().flat_map(|l| l.bias.as_ref().map_or(vec![0.0; l.weight.dims()[1]], |b| host(b.val()))).collect()
        });
        Self::from_blocks(&ws, k, n, bias, bf16)
    }

    /// `x` `[m, k]` (row-major) → `[m, n]`. Only on a CPU with AVX-512 ([`t1_ops::kernels::available`]).
    #[cfg(test)]
    pub(crate) fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.apply_split(x, m, &Team::new(1))
    }

    /// `x` `[m, k]` → `[m, n]` with the column panels split between the threads of `team`:
    /// each weight is read once for all `m` rows. Only on a CPU with AVX-512 ([`t1_ops::kernels::available`]).
    pub(crate) fn apply_split(&self, x: &[f32], m: usize, team: &Team) -> Vec<f32> {
        let n = self.n;
        assert_eq!(x.len(), m * self.k, "input of {} values is not [{m}, {}]", x.len(), self.k);
        assert!(available(), "packed projections need AVX-512");
        let mut y = vec![0.0f32; m * n];
        let panels = n.div_ceil(NT);
        let parts = team.parts().min(panels);
        if parts == 1 {
            // SAFETY: `y` is `[m, n]` and no one else writes to it.
            unsafe { self.columns(x, m, 0..panels, Out(y.as_mut_ptr())) };
            return y;
        }
        let out = Out(y.as_mut_ptr());
        team.run(&|p| {
            if p < parts {
                // SAFETY: `y` is `[m, n]`, outlives the run, and the parts write disjoint columns.
                unsafe { self.columns(x, m, p * panels / parts..(p + 1) * panels / parts, out) };
            }
        });
        y
    }

    /// Writes the columns of panels `range` for the rows `x` `[m, k]` into `y` `[m, n]`.
    ///
    /// # Safety
    /// `y` must point to `m * n` values that no one else reads or writes in these columns.
    unsafe fn columns(&self, x: &[f32], m: usize, range: std::ops::Range<usize>, y: Out) {
        let (k, n) = (self.k, self.n);
        let mut acc = [[0.0f32; NT]; MR];
        for jb in range {
            let cols = (n - jb * NT).min(NT);
            for b in 0..m.div_ceil(MR) {
                let rows = (m - b * MR).min(MR);
                let x = &x[b * MR * k..(b * MR + rows) * k];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `apply_split` checked the CPU (`available()`).
                unsafe {
                    match &self.panels {
                        Panels::F32(p) => avx512::panel_product(x, rows, &p[jb * k * NT..][..k * NT], &mut acc),
                        Panels::Bf16(p) => avx512::panel_product_bf16(x, rows, &p[jb * k * NT..][..k * NT], &mut acc),
                    }
                };
                for (r, acc_row) in acc.iter().enumerate().take(rows) {
                    // SAFETY: within `[m, n]` (the caller's promise), these columns are ours
                    let out = unsafe { std::slice::from_raw_parts_mut(y.0.add((b * MR + r) * n + jb * NT), cols) };
                    out.copy_from_slice(&acc_row[..cols]);
                    if let Some(bias) = &self.bias {
                        for (o, bv) in out.iter_mut().zip(&bias[jb * NT..jb * NT + cols]) {
                            *o += bv;
                        }
                    }
                }
            }
        }
    }
}

/// The output of [`PackedLinear::apply_split`], written by the team's threads in disjoint
/// columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the threads write disjoint elements (see `PackedLinear::columns`).
unsafe impl Sync for Out {}
unsafe impl Send for Out {}


#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NT};
    use std::arch::x86_64::*;

    /// `acc[r][c] = Σ_kk x[r][kk] · panel[kk][c]` for the `rows` (1..=8) rows of `x`
    /// (`[rows, k]`), summed in order of `kk` with fused multiply-adds; 8 rows × 32 columns in
    /// 16 registers (rows past `rows` repeat the last one).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_product(x: &[f32], rows: usize, panel: &[f32], acc: &mut [[f32; NT]; MR]) {
        // 64 panel rows of 128 bytes ahead
        panel_loop(x, rows, panel, acc, 64, |p| (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))))
    }

    /// [`panel_product`] with the panel in bf16: each weight widened to f32 (shifted into the
    /// high half), then the same f32 multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_product_bf16(x: &[f32], rows: usize, panel: &[u16], acc: &mut [[f32; NT]; MR]) {
        let widen = |p: *const u16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))));
        // 128 panel rows of 64 bytes ahead
        panel_loop(x, rows, panel, acc, 128, |p| (widen(p), widen(p.add(16))))
    }

    /// The loop of both: `load` gives the 32 weights of a panel row as f32; one prefetch per
    /// 64 bytes, `ahead` rows ahead.
    #[inline(always)]
    unsafe fn panel_loop<T>(x: &[f32], rows: usize, panel: &[T], acc: &mut [[f32; NT]; MR], ahead: usize, load: impl Fn(*const T) -> (__m512, __m512)) {
        let k = panel.len() / NT;
        assert!((1..=MR).contains(&rows) && x.len() == rows * k && panel.len() == k * NT, "panel and rows disagree");
        let lines = (NT * size_of::<T>()).div_ceil(64);
        let mut a = [_mm512_setzero_ps(); 2 * MR];
        let xp: [*const f32; MR] = std::array::from_fn(|r| x.as_ptr().add(r.min(rows - 1) * k));
        let mut wp = panel.as_ptr();
        for kk in 0..k {
            if kk + ahead < k {
                for line in 0..lines {
                    _mm_prefetch::<_MM_HINT_T0>((wp.add(ahead * NT) as *const i8).add(64 * line));
                }
            }
            let (w0, w1) = load(wp);
            for r in 0..MR {
                let x = _mm512_set1_ps(*xp[r].add(kk));
                a[2 * r] = _mm512_fmadd_ps(x, w0, a[2 * r]);
                a[2 * r + 1] = _mm512_fmadd_ps(x, w1, a[2 * r + 1]);
            }
            wp = wp.add(NT);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            _mm512_storeu_ps(row.as_mut_ptr(), a[2 * r]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), a[2 * r + 1]);
        }
    }
}

pub(crate) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// The projections of one decoder layer, packed; q/k/v and gate/up each as one product.
#[derive(Debug)]
pub(crate) struct PackedLayer {
    pub qkv: PackedLinear,
    pub o: PackedLinear,
    pub gate_up: PackedLinear,
    pub down: PackedLinear,
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
    #[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
    fn avx512_packed_products_match_a_naive_matmul() {
        assert!(available(), "asked to test the AVX-512 packed products on a CPU without AVX-512F");
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
            // bf16 panels: the same products of the weights rounded to bf16
            let w16: Vec<f32> = w.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
            for (b, bf16) in [(None, false), (Some(bias.clone()), false), (Some(bias.clone()), true)] {
                let want = naive(&x, m, k, if bf16 { &w16 } else { &w }, n, b.as_deref());
                let packed = PackedLinear::new(if bf16 { &w16 } else { &w }, k, n, b, bf16);
                let one = packed.apply(&x, m);
                let err = t1_model::compare::max_abs_diff(&one, &want);
                assert!(err < 1e-5 * (k as f32).sqrt().max(1.0), "m={m} k={k} n={n}: max error {err}");
                // columns split between threads: the same sums, bit for bit
                for threads in [2, 3] {
                    assert_eq!(packed.apply_split(&x, m, &Team::new(threads)), one, "m={m} k={k} n={n}, {threads} threads");
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    /// Not a test: `cargo test --release -p t1-model packed_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn packed_speed() {
        // the 18M benchmark model: 6 layers of qkv 512→768, o 512→512, gate_up 512→2816, down 1408→512
        let shapes = [(512, 768), (512, 512), (512, 2816), (1408, 512)];
        let layers: Vec<Vec<PackedLinear>> = (0..6)
            .map(|_| shapes.iter().map(|&(k, n)| PackedLinear::new(&vec![0.01; k * n], k, n, None, false)).collect())
            .collect();
        let flops_per_row: usize = 6 * shapes.iter().map(|&(k, n)| 2 * k * n).sum::<usize>();
        let run = |rows: usize, range: Option<(usize, usize)>| {
            let mut acc = [[0.0f32; NT]; MR];
            for l in &layers {
                for p in l {
                    let xt = vec![0.5f32; rows.div_ceil(MR) * p.k * MR];
                    let panels = p.n.div_ceil(NT);
                    let (a, b) = range.map_or((0, panels), |(i, n)| (i * panels / n, (i + 1) * panels / n));
                    for jb in a..b {
                        for blk in 0..rows.div_ceil(MR) {
                            unsafe { avx512::panel_product(&xt[blk * p.k * MR..(blk + 1) * p.k * MR], MR, &p.f32_panels()[jb * p.k * NT..][..p.k * NT], &mut acc) };
                        }
                    }
                }
            }
            std::hint::black_box(acc);
        };
        let time = |label: &str, rows_total: usize, f: &(dyn Fn() + Sync)| {
            f();
            let t = Instant::now();
            for _ in 0..20 {
                f();
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0 / 20.0;
            println!("{label}: {ms:.2} ms per step, {:.0} GFLOP/s", (flops_per_row * rows_total) as f64 / ms / 1e6);
        };
        let small = PackedLinear::new(&vec![0.01; 256 * 64], 256, 64, None, false);
        let hot = || {
            let mut acc = [[0.0f32; NT]; MR];
            let xt = vec![0.5f32; 256 * MR];
            for _ in 0..100_000 {
                for jb in 0..2 {
                    unsafe { avx512::panel_product(&xt, MR, &small.f32_panels()[jb * 256 * NT..][..256 * NT], &mut acc) };
                }
            }
            std::hint::black_box(acc);
        };
        let hot_flops = 100_000.0 * 2.0 * 256.0 * 64.0 * 8.0;
        let t = Instant::now();
        hot();
        println!("hot, 1 thread: {:.0} GFLOP/s", hot_flops / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(hot);
            hot();
        });
        println!("hot, 2 threads: {:.0} GFLOP/s", 2.0 * hot_flops / t.elapsed().as_secs_f64() / 1e9);
        time("1 thread, 8 rows", 8, &|| run(8, None));
        time("1 thread, 16 rows", 16, &|| run(16, None));
        time("2 threads x 8 rows, all columns", 16, &|| std::thread::scope(|s| {
            s.spawn(|| run(8, None));
            run(8, None);
        }));
        time("2 threads x 16 rows, half the columns (no sync per layer)", 16, &|| std::thread::scope(|s| {
            s.spawn(|| run(16, Some((1, 2))));
            run(16, Some((0, 2)));
        }));
        let layers16: Vec<Vec<PackedLinear>> = (0..6)
            .map(|_| shapes.iter().map(|&(k, n)| PackedLinear::new(&vec![0.01; k * n], k, n, None, true)).collect())
            .collect();
        let team = Team::new(2);
        let x16 = vec![0.5f32; 16 * 1408];
        time("team of 2, 16 rows, f32 (apply_split)", 16, &|| {
            for l in &layers {
                for p in l {
                    std::hint::black_box(p.apply_split(&x16[..16 * p.k], 16, &team));
                }
            }
        });
        time("team of 2, 16 rows, bf16 (apply_split)", 16, &|| {
            for l in &layers16 {
                for p in l {
                    std::hint::black_box(p.apply_split(&x16[..16 * p.k], 16, &team));
                }
            }
        });
    }

    #[test]
    fn blocks_side_by_side_pack_as_their_concatenation() {
        // widths that cut panels anywhere; each block row-major [k, width]
        let (k, widths) = (5, [40, 30, 5, 32]);
        let n: usize = widths.iter().sum();
        let whole: Vec<f32> = (0..k * n).map(|i| i as f32).collect(); // [k, n]
        let mut blocks = vec![];
        let mut first = 0;
        for w in widths {
            blocks.push((0..k).flat_map(|kk| whole[kk * n + first..kk * n + first + w].to_vec()).collect::<Vec<f32>>());
            first += w;
        }
        let refs: Vec<&[f32]> = blocks.iter().map(Vec::as_slice).collect();
        let packed = PackedLinear::from_blocks(&refs, k, n, None, false);
        // the reference: column j of row kk at panel j / NT, lane j % NT
        let mut want = vec![0.0; n.div_ceil(NT) * k * NT];
        for kk in 0..k {
            for j in 0..n {
                want[((j / NT) * k + kk) * NT + j % NT] = whole[kk * n + j];
            }
        }
        assert_eq!(packed.f32_panels(), want.as_slice());
    }
}
