//! Element-wise and row kernels on `f32` slices, shared by the fused burn-flex operations
//! (`flex.rs`) and the host decoding engine (the `t1-cpu` crate).
//!
//! Each works on any x86-64 or other CPU; the exponential uses AVX-512 where the CPU has it.

/// Whether this CPU has AVX-512F (x86-64 only): the vector `exp` here and the host decoding
/// engine's packed projections use it; elsewhere they fall back to libm and gemm.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product with 16 independent partial sums (vectorised by LLVM), summed pairwise.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += xa[i] * xb[i];
        }
    }
    pairwise(acc) + tail
}

/// Sum with 16 independent partial sums, summed pairwise.
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    pairwise(acc) + tail
}

/// Largest value (−∞ for an empty slice; NaN is skipped as by `f32::max`).
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.into_iter().fold(tail, f32::max)
}

#[inline(always)]
fn pairwise(mut acc: [f32; 16]) -> f32 {
    // a chain of 16 dependent adds costs more than the products
    let mut half = 8;
    while half > 0 {
        for i in 0..half {
            acc[i] += acc[i + half];
        }
        half /= 2;
    }
    acc[0]
}

/// `x = exp(x)` for every element: AVX-512 where the CPU has it, libm elsewhere.
pub fn exp(x: &mut [f32]) {
    if available() {
        // SAFETY: the CPU has AVX-512 (checked at run time).
        unsafe { exp_in_place(x) }
    } else {
        x.iter_mut().for_each(|v| *v = v.exp());
    }
}

/// `x = exp(x)` for every element, 16 at a time with AVX-512 (a degree-6 polynomial on the
/// reduced argument and `vscalefps`; relative error below 3e-7 against libm's `expf`, tested;
/// 0 below −87.3 where libm gives denormals), the tail with libm, which works one value at a
/// time.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
pub unsafe fn exp_in_place(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(16);
    #[cfg(target_arch = "x86_64")]
    for c in &mut chunks {
        use std::arch::x86_64::*;
        let v = _mm512_loadu_ps(c.as_ptr());
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        // r = v - n ln 2 in two parts (Cody-Waite), |r| <= ln 2 / 2
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), v);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_scalef_ps(p, n);
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(-87.3));
        let y = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(88.8));
        _mm512_storeu_ps(c.as_mut_ptr(), _mm512_mask_blend_ps(over, y, _mm512_set1_ps(f32::INFINITY)));
    }
    for v in chunks.into_remainder() {
        *v = v.exp();
    }
}

/// Values per chunk of the element-wise kernels: the chunk's `exp` buffer stays in L1.
const CHUNK: usize = 1024;

/// `out = silu(gate) * up = gate * σ(gate) * up`, element-wise.
pub fn swiglu_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((g, u), o) in gate.chunks(CHUNK).zip(up.chunks(CHUNK)).zip(out.chunks_mut(CHUNK)) {
        // o = exp(-g), then g / (1 + exp(-g)) * u; exp(-g) = inf for g < -88.7 gives -0
        o.iter_mut().zip(g).for_each(|(o, g)| *o = -g);
        exp(o);
        o.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (g, u))| *o = g / (1.0 + *o) * u);
    }
}

/// Gradients of [`swiglu_into`]: with `s = σ(g)`, `d_gate = d_out · up · s · (1 + g · (1 − s))`
/// and `d_up = d_out · g · s`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], d_out: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let chunks = gate.chunks(CHUNK).zip(up.chunks(CHUNK)).zip(d_out.chunks(CHUNK));
    for (((g, u), dy), (dg, du)) in chunks.zip(d_gate.chunks_mut(CHUNK).zip(d_up.chunks_mut(CHUNK))) {
        dg.iter_mut().zip(g).for_each(|(e, g)| *e = -g);
        exp(dg);
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + dg[i]);
            let gs = g[i] * s;
            du[i] = dy[i] * gs;
            dg[i] = dy[i] * u[i] * (s + gs * (1.0 - s));
        }
    }
}

/// Softmax of each row of `scores + bias` (rows of `bias.len()` values), into `out`.
pub fn softmax_biased(scores: &[f32], bias: &[f32], out: &mut [f32]) {
    for (o, x) in out.chunks_exact_mut(bias.len()).zip(scores.chunks_exact(bias.len())) {
        o.iter_mut().zip(x.iter().zip(bias)).for_each(|(o, (x, b))| *o = x + b);
        let m = max(o);
        o.iter_mut().for_each(|v| *v -= m);
        exp(o);
        let inv = 1.0 / sum(o);
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Gradient of a row-wise softmax with output `probs`: `d_x = p · (d_p − Σ d_p · p)` per row of
/// `len` values.
pub fn softmax_backward(probs: &[f32], d_probs: &[f32], d_x: &mut [f32], len: usize) {
    for ((p, g), dx) in probs.chunks_exact(len).zip(d_probs.chunks_exact(len)).zip(d_x.chunks_exact_mut(len)) {
        let inner = dot(p, g);
        dx.iter_mut().zip(p.iter().zip(g)).for_each(|(dx, (p, g))| *dx = p * (g - inner));
    }
}

/// Log-softmax of each row of `len` values: `out = x − max − ln Σ exp(x − max)`.
pub fn log_softmax_rows(x: &[f32], out: &mut [f32], len: usize) {
    let mut buf = vec![0.0f32; len];
    for (o, x) in out.chunks_exact_mut(len).zip(x.chunks_exact(len)) {
        let m = max(x);
        buf.iter_mut().zip(x).for_each(|(b, x)| *b = x - m);
        o.copy_from_slice(&buf);
        exp(&mut buf);
        let lse = sum(&buf).ln();
        o.iter_mut().for_each(|v| *v -= lse);
    }
}

/// Gradient of [`log_softmax_rows`] with output `logp`: `d_x = d_y − exp(logp) · Σ d_y` per row.
pub fn log_softmax_backward(logp: &[f32], d_y: &[f32], d_x: &mut [f32], len: usize) {
    for ((lp, g), dx) in logp.chunks_exact(len).zip(d_y.chunks_exact(len)).zip(d_x.chunks_exact_mut(len)) {
        let total = sum(g);
        dx.copy_from_slice(lp);
        exp(dx);
        dx.iter_mut().zip(g).for_each(|(dx, g)| *dx = g - *dx * total);
    }
}

/// Rotate-half RoPE of `x` `[b, t, n, d]` with `cos`/`sin` tables of the same shape,
/// written to `out` as `[b, n, t, d]` (heads first, as attention reads them):
/// `y = x · cos + rotate_half(x) · sin`, `rotate_half([x1, x2]) = [−x2, x1]`.
pub fn rope_to_heads(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], [_, t, n, d]: [usize; 4]) {
    let half = d / 2;
    for (row, ((x, c), s)) in x.chunks_exact(d).zip(cos.chunks_exact(d)).zip(sin.chunks_exact(d)).enumerate() {
        let (bi, ti, ni) = (row / (t * n), (row / n) % t, row % n);
        let y = &mut out[((bi * n + ni) * t + ti) * d..][..d];
        let (y1, y2) = y.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        for i in 0..half {
            y1[i] = x1[i] * c[i] - x2[i] * s[i];
            y2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
        }
    }
}

/// Gradient of [`rope_to_heads`]: `d_y` `[b, n, t, d]` → `d_x` `[b, t, n, d]`, the transposed
/// rotation: `d_x1 = d_y1 · cos1 + d_y2 · sin2`, `d_x2 = d_y2 · cos2 − d_y1 · sin1`.
pub fn rope_to_heads_backward(d_y: &[f32], cos: &[f32], sin: &[f32], d_x: &mut [f32], [_, t, n, d]: [usize; 4]) {
    let half = d / 2;
    for (row, ((dx, c), s)) in d_x.chunks_exact_mut(d).zip(cos.chunks_exact(d)).zip(sin.chunks_exact(d)).enumerate() {
        let (bi, ti, ni) = (row / (t * n), (row / n) % t, row % n);
        let dy = &d_y[((bi * n + ni) * t + ti) * d..][..d];
        let (dy1, dy2) = dy.split_at(half);
        let (dx1, dx2) = dx.split_at_mut(half);
        for i in 0..half {
            dx1[i] = dy1[i] * c[i] + dy2[i] * s[half + i];
            dx2[i] = dy2[i] * c[half + i] - dy1[i] * s[i];
        }
    }
}

/// RMSNorm of each row of `gamma.len()` values: `y = x · r · gamma` with
/// `r = 1 / sqrt(mean(x²) + eps)`, as burn's `RmsNorm` (which divides by `1 / r`).
pub fn rms_norm_into(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let n = gamma.len();
    for (y, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        let r = inv_rms(x, eps);
        y.iter_mut().zip(x.iter().zip(gamma)).for_each(|(y, (x, g))| *y = x * r * g);
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// Gradients of [`rms_norm_into`]: per row, `d_x = r · (d_y · gamma − x · r² · mean(d_y · gamma · x))`;
/// `d_gamma = Σ_rows d_y · x · r` (added to `d_gamma`).
pub fn rms_norm_backward(x: &[f32], gamma: &[f32], eps: f32, d_y: &[f32], d_x: &mut [f32], d_gamma: &mut [f32]) {
    let n = gamma.len();
    for ((x, dy), dx) in x.chunks_exact(n).zip(d_y.chunks_exact(n)).zip(d_x.chunks_exact_mut(n)) {
        let r = inv_rms(x, eps);
        // dx = dy · gamma first, then the correction
        dx.iter_mut().zip(dy.iter().zip(gamma)).for_each(|(dx, (dy, g))| *dx = dy * g);
        let inner = dot(dx, x) / n as f32;
        let c = r * r * inner;
        dx.iter_mut().zip(x).for_each(|(dx, x)| *dx = r * (*dx - x * c));
        d_gamma.iter_mut().zip(dy.iter().zip(x)).for_each(|(dg, (dy, x))| *dg += dy * x * r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
    fn avx512_vector_exp_matches_libm() {
        assert!(available(), "asked to test the AVX-512 exp on a CPU without AVX-512F");
        let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.001).collect();
        xs.extend([f32::NEG_INFINITY, -1e9, -87.0, 0.0, -0.0, 1e-30, 88.0, 89.0, f32::INFINITY, 1e9]);
        let mut got = xs.clone();
        // SAFETY: checked above
        unsafe { exp_in_place(&mut got) };
        for (x, g) in xs.iter().zip(&got) {
            let want = x.exp();
            let ok = if want < 1e-37 { *g < 1e-37 && *g >= 0.0 } else { ((g - want) / want).abs() < 3e-7 || (want.is_infinite() && g.is_infinite()) };
            assert!(ok, "exp({x}) = {g}, libm {want}");
        }
        let mut nan = [f32::NAN; 16];
        exp(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()), "NaN must stay NaN (a diverged loss is detected downstream)");
    }

    #[test]
    fn reductions_match_sequential_ones() {
        let xs: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
        for n in [0, 1, 15, 16, 17, 100, 1037] {
            let x = &xs[..n];
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(x) as f64 - want_sum).abs() < 1e-3, "sum of {n}");
            assert_eq!(max(x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "max of {n}");
            let want_dot: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            assert!((dot(x, x) as f64 - want_dot).abs() < 1e-2, "dot of {n}");
        }
    }

    #[test]
    fn swiglu_and_its_gradient_match_the_formulas() {
        let n = 3000; // more than two chunks, not a multiple of 16
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 1500.0) / 15.0).collect(); // -100 .. 100
        let u: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 4.0 - 2.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 13) % 11) as f32 / 5.0 - 1.0).collect();
        let mut y = vec![0.0; n];
        swiglu_into(&g, &u, &mut y);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&g, &u, &dy, &mut dg, &mut du);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        for i in 0..n {
            let (gi, ui, dyi) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0);
            assert!(close(y[i], gi * sig(gi) * ui), "silu({gi}) * {ui} = {}", y[i]);
            // central difference of y in g and u, in f64
            let f = |g: f64, u: f64| g * sig(g) * u;
            let h = 1e-4;
            let want_dg = dyi * (f(gi + h, ui) - f(gi - h, ui)) / (2.0 * h);
            assert!(close(dg[i], want_dg), "d_gate at g={gi}: {} vs {want_dg}", dg[i]);
            assert!(close(du[i], dyi * gi * sig(gi)), "d_up at g={gi}");
        }
    }

    #[test]
    fn softmax_and_its_gradient_match_the_formulas() {
        let len = 37;
        let rows = 5;
        let scores: Vec<f32> = (0..rows * len).map(|i| ((i * 17) % 23) as f32 / 3.0 - 4.0).collect();
        // keys after 20 masked as the model masks them
        let bias: Vec<f32> = (0..len).map(|j| if j <= 20 { 0.0 } else { -1e9 }).collect();
        let mut p = vec![0.0; rows * len];
        softmax_biased(&scores, &bias, &mut p);
        let mut uniform = vec![0.0; len];
        softmax_biased(&scores[..len], &vec![-1e9; len], &mut uniform);
        assert!(uniform.iter().all(|&v| (v - 1.0 / len as f32).abs() < 1e-6), "a fully masked row is uniform (padding query), not NaN: {uniform:?}");
        for r in 0..rows {
            let x: Vec<f64> = (0..len).map(|j| scores[r * len + j] as f64 + bias[j] as f64).collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
            for j in 0..len {
                let want = (x[j] - m).exp() / z;
                assert!((p[r * len + j] as f64 - want).abs() < 1e-6, "p[{r}][{j}]");
            }
        }
        let d: Vec<f32> = (0..rows * len).map(|i| ((i * 5) % 7) as f32 - 3.0).collect();
        let mut dx = vec![0.0; rows * len];
        softmax_backward(&p, &d, &mut dx, len);
        for r in 0..rows {
            let pr = &p[r * len..][..len];
            let inner: f64 = (0..len).map(|k| pr[k] as f64 * d[r * len + k] as f64).sum();
            for j in 0..len {
                // Jacobian row: dp_k/dx_j = p_k (δ_kj − p_j)
                let want = pr[j] as f64 * (d[r * len + j] as f64 - inner);
                assert!((dx[r * len + j] as f64 - want).abs() < 1e-6, "dx[{r}][{j}]");
            }
        }
    }

    #[test]
    fn log_softmax_and_its_gradient_match_the_formulas() {
        let (rows, len) = (4, 300);
        let x: Vec<f32> = (0..rows * len).map(|i| ((i * 37) % 101) as f32 / 4.0 - 12.0).collect();
        let mut lp = vec![0.0; rows * len];
        log_softmax_rows(&x, &mut lp, len);
        let g: Vec<f32> = (0..rows * len).map(|i| ((i * 11) % 13) as f32 / 6.0 - 1.0).collect();
        let mut dx = vec![0.0; rows * len];
        log_softmax_backward(&lp, &g, &mut dx, len);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * len..][..len].iter().map(|&v| v as f64).collect();
            let m = xr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + xr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let total: f64 = g[r * len..][..len].iter().map(|&v| v as f64).sum();
            for j in 0..len {
                assert!((lp[r * len + j] as f64 - (xr[j] - lse)).abs() < 1e-5, "logp[{r}][{j}]");
                let want = g[r * len + j] as f64 - (xr[j] - lse).exp() * total;
                assert!((dx[r * len + j] as f64 - want).abs() < 1e-5, "dx[{r}][{j}]");
            }
        }
    }

    #[test]
    fn a_nan_input_makes_its_row_nan() {
        let mut x = vec![0.5f32; 40];
        x[7] = f32::NAN;
        let mut out = vec![0.0; 40];
        softmax_biased(&x, &[0.0; 20], &mut out);
        assert!(out[..20].iter().all(|v| v.is_nan()) && out[20..].iter().all(|v| v.is_finite()), "softmax: {out:?}");
        log_softmax_rows(&x, &mut out, 20);
        assert!(out[..20].iter().all(|v| v.is_nan()) && out[20..].iter().all(|v| v.is_finite()), "log-softmax: {out:?}");
        rms_norm_into(&x, &[1.0; 20], 1e-6, &mut out);
        assert!(out[..20].iter().all(|v| v.is_nan()) && out[20..].iter().all(|v| v.is_finite()), "rms norm: {out:?}");
        swiglu_into(&x, &[1.0; 40], &mut out);
        assert!(out[7].is_nan() && out.iter().filter(|v| v.is_nan()).count() == 1, "swiglu: {out:?}");
    }
}
