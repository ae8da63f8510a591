//! [`FusedOps`] on burn's CubeCL backends (wgpu and CUDA, without burn-fusion): RMSNorm
//! forward and backward as CubeCL kernels, written once for every CubeCL runtime; the other
//! operations compose burn's ops. The kernels run in f32 (other dtypes compose, accumulating in
//! f32 as burn's `RmsNorm` does).
//!
//! Simple rather than fast: one unit per row for the forward pass and for `d_x` (each loops
//! over the row; the `d_x` kernel also writes the row's `r = 1 / sqrt(mean(x²) + eps)`), and
//! one unit per column for `d_gamma` (a loop over the rows). What they prove is that a fused
//! kernel reaches the GPU backends through the same trait as the CPU's.

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::{compose, FusedOps};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps for CubeBackend<R, F, I, BT> {
    fn rms_norm<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, D> {
        // empty tensors too: no launch over zero units
        if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || gamma.dims()[0] != x.dims()[D - 1] || x.shape().num_elements() == 0 {
            return compose::rms_norm(x, gamma, eps);
        }
        let y = kernels::rms_norm::<R>(x.into_primitive().tensor(), gamma.into_primitive().tensor(), eps as f32);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    fn rms_norm_backward<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, eps: f64, d_y: Tensor<Self, D>) -> (Tensor<Self, D>, Tensor<Self, 1>) {
        let f32s = [x.dtype(), gamma.dtype(), d_y.dtype()].iter().all(|d| *d == DType::F32);
        if !f32s || gamma.dims()[0] != x.dims()[D - 1] || d_y.dims() != x.dims() || x.shape().num_elements() == 0 {
            return compose::rms_norm_backward(x, gamma, eps, d_y);
        }
        let (prim_x, prim_g, prim_d) = (x.into_primitive().tensor(), gamma.into_primitive().tensor(), d_y.into_primitive().tensor());
        let (d_x, d_gamma) = kernels::rms_norm_backward::<R>(prim_x, prim_g, eps as f32, prim_d);
        (Tensor::from_primitive(TensorPrimitive::Float(d_x)), Tensor::from_primitive(TensorPrimitive::Float(d_gamma)))
    }
}

mod kernels {
    // `cubecl::prelude` has its own (kernel-side) `Tensor`: burn's stays out of this module
    use burn::tensor::Shape;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::ops::reshape;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeRuntime;
    use cubecl::{calculate_cube_count_elemwise, prelude::*};

    // Every tensor is contiguous (made so by the host code below): `x`, `dy`, `y`, `dx` are
    // `[rows, n]` row-major, `gamma` and `dgamma` `[n]`, `r` `[rows]`.

    /// One unit per row: `y = x · r · gamma` with `r = 1 / sqrt(mean(x²) + eps)`.
    #[cube(launch)]
    fn rms_norm_fwd_kernel<F: Float>(x: &Tensor<F>, gamma: &Tensor<F>, y: &mut Tensor<F>, eps: f32, inv_n: f32, #[define(F)] _dtype: StorageType) {
        let row = ABSOLUTE_POS;
        if row >= x.shape(0) {
            terminate!();
        }
        let n = x.shape(1);
        let mut ss = F::new(0.0);
        for j in 0..n {
            let v = x[row * n + j];
            ss += v * v;
        }
        let r = F::new(1.0) / (ss * F::cast_from(inv_n) + F::cast_from(eps)).sqrt();
        for j in 0..n {
            y[row * n + j] = x[row * n + j] * r * gamma[j];
        }
    }

    /// One unit per row: with `g = dy · gamma`, `dx = r · g − x · r³ · mean(g · x)` (that is
    /// `r · (g − x̂ · mean(g · x̂))`); the row's `r` goes to `r_out` for the `dgamma` kernel.
    #[cube(launch)]
    fn rms_norm_bwd_dx_kernel<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        dy: &Tensor<F>,
        dx: &mut Tensor<F>,
        r_out: &mut Tensor<F>,
        eps: f32,
        inv_n: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let row = ABSOLUTE_POS;
        if row >= x.shape(0) {
            terminate!();
        }
        let n = x.shape(1);
        let mut ss = F::new(0.0);
        let mut gx = F::new(0.0);
        for j in 0..n {
            let v = x[row * n + j];
            ss += v * v;
            gx += dy[row * n + j] * gamma[j] * v;
        }
        let inv_n = F::cast_from(inv_n);
        let r = F::new(1.0) / (ss * inv_n + F::cast_from(eps)).sqrt();
        let c = r * r * r * gx * inv_n;
        for j in 0..n {
            dx[row * n + j] = r * dy[row * n + j] * gamma[j] - x[row * n + j] * c;
        }
        r_out[row] = r;
    }

    /// One unit per column: `dgamma = Σ_rows dy · x · r`.
    #[cube(launch)]
    fn rms_norm_bwd_dgamma_kernel<F: Float>(x: &Tensor<F>, dy: &Tensor<F>, r: &Tensor<F>, dgamma: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
        let col = ABSOLUTE_POS;
        let n = x.shape(1);
        if col >= n {
            terminate!();
        }
        let mut acc = F::new(0.0);
        for row in 0..x.shape(0) {
            acc += dy[row * n + col] * x[row * n + col] * r[row];
        }
        dgamma[col] = acc;
    }

    /// Cubes for `units` units, one per row or column; the count may round up, and the kernels
    /// skip the units past the end.
    fn grid<R: CubeRuntime>(client: &ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
        let dim = CubeDim::new(client, units);
        (calculate_cube_count_elemwise(client, units, dim), dim)
    }

    /// `[.., n]` as a contiguous `[rows, n]`, with the original shape, `rows` and `n`.
    fn as_2d<R: CubeRuntime>(t: CubeTensor<R>) -> (CubeTensor<R>, Shape, usize, usize) {
        let shape: Shape = t.meta.shape().clone();
        let rank = shape.num_dims();
        assert!(rank >= 1, "rms_norm: rank-0 input");
        let n = shape[rank - 1];
        let rows = shape.num_elements() / n.max(1);
        let t = into_contiguous(t);
        let t = reshape(t, Shape::new([rows, n]));
        (t, shape, rows, n)
    }

    /// RMSNorm of `x` `[.., n]` (not empty) over its last axis with `gamma` `[n]`.
    pub(crate) fn rms_norm<R: CubeRuntime>(x: CubeTensor<R>, gamma: CubeTensor<R>, eps: f32) -> CubeTensor<R> {
        let (x2, shape, rows, n) = as_2d(x);
        let gamma = into_contiguous(gamma);
        assert_eq!(gamma.meta.shape().num_elements(), n, "rms_norm: gamma must be [n]");
        let dtype = x2.dtype;
        let client = x2.client.clone();

        let y = empty_device_contiguous_dtype::<R>(client.clone(), x2.device.clone(), Shape::new([rows, n]), dtype);
        let (count, dim) = grid(&client, rows);
        let (x2, gamma, out) = (x2.into_tensor_arg(), gamma.into_tensor_arg(), y.clone().into_tensor_arg());
        rms_norm_fwd_kernel::launch::<R>(&client, count, dim, x2, gamma, out, eps, 1.0 / n as f32, dtype.into());

        reshape(y, shape)
    }

    /// The gradients `(dx, dgamma)` of [`rms_norm`] for the output gradient `dy` (`x`'s shape).
    pub(crate) fn rms_norm_backward<R: CubeRuntime>(x: CubeTensor<R>, gamma: CubeTensor<R>, eps: f32, dy: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x2, shape, rows, n) = as_2d(x);
        let (dy2, dy_shape, _, _) = as_2d(dy);
        assert_eq!(shape, dy_shape, "rms_norm_backward: dy must have x's shape");
        let gamma = into_contiguous(gamma);
        assert_eq!(gamma.meta.shape().num_elements(), n, "rms_norm: gamma must be [n]");
        let dtype = x2.dtype;
        let client = x2.client.clone();
        let device = x2.device.clone();

        let dx = empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), Shape::new([rows, n]), dtype);
        let r = empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), Shape::new([rows]), dtype);
        let dgamma = empty_device_contiguous_dtype::<R>(client.clone(), device.clone(), Shape::new([n]), dtype);

        let (count, dim) = grid(&client, rows);
        let args = (x2.clone().into_tensor_arg(), gamma.into_tensor_arg(), dy2.clone().into_tensor_arg(), dx.clone().into_tensor_arg(), r.clone().into_tensor_arg());
        rms_norm_bwd_dx_kernel::launch::<R>(&client, count, dim, args.0, args.1, args.2, args.3, args.4, eps, 1.0 / n as f32, dtype.into());

        // after the dx kernel, which wrote `r` (one client, one stream)
        let (count, dim) = grid(&client, n);
        let (x2, dy2, r, out) = (x2.into_tensor_arg(), dy2.into_tensor_arg(), r.into_tensor_arg(), dgamma.clone().into_tensor_arg());
        rms_norm_bwd_dgamma_kernel::launch::<R>(&client, count, dim, x2, dy2, r, out, dtype.into());

        (reshape(dx, shape), dgamma)
    }
}

