//! Comparisons of host values that fail on NaN and infinities.
//!
//! `f32::max` drops NaN (`NaN.max(0.0) == 0.0`), so a fold with it scores an all-NaN output as
//! a perfect match. Every comparison in t1 (unit tests, integration tests, the cross-backend
//! check) goes through these functions instead: a non-finite value on either side makes the
//! distance +∞, so any `distance <= tolerance` check fails.

/// Largest |a_i − b_i|, or +∞ when any value of `a` or `b` is NaN or infinite.
///
/// # Panics
/// When the lengths differ (a caller's bug, not a numerical outcome).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices have different lengths");
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if !d.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max(d);
    }
    worst
}

/// Largest |a_i|, or +∞ when any value is NaN or infinite.
pub fn max_abs(a: &[f32]) -> f32 {
    let mut worst = 0f32;
    for x in a {
        if !x.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max(x.abs());
    }
    worst
}

/// [`max_abs_diff`] divided by the largest |a_i| (the reference's scale, at least `floor`);
/// +∞ on any non-finite value.
pub fn max_rel_diff(a: &[f32], b: &[f32], floor: f32) -> f32 {
    let d = max_abs_diff(a, b);
    let scale = max_abs(a);
    if !scale.is_finite() {
        return f32::INFINITY;
    }
    d / scale.max(floor)
}

/// Bitwise equality (NaN payloads and the sign of zero included).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_infinitely_far() {
        let nan = vec![f32::NAN; 4];
        assert_eq!(max_abs_diff(&nan, &nan), f32::INFINITY);
        assert_eq!(max_abs_diff(&[0.0, 1.0], &[0.0, f32::NAN]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::INFINITY], &[f32::INFINITY]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::NEG_INFINITY, 0.0], &[1.0, 0.0]), f32::INFINITY);
        assert_eq!(max_abs(&[1.0, f32::NAN]), f32::INFINITY);
        assert_eq!(max_rel_diff(&[f32::NAN], &[f32::NAN], 1e-12), f32::INFINITY);
        assert_eq!(max_rel_diff(&[1.0], &[f32::NAN], 1e-12), f32::INFINITY);
        // so a tolerance check written either way round fails
        let d = max_abs_diff(&nan, &nan);
        assert!(!(d <= 1e9) && d > 1e9);
    }

    #[test]
    fn finite_values_give_the_largest_difference() {
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 2.0]), 1.0);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
        assert_eq!(max_abs(&[-4.0, 2.0]), 4.0);
        assert_eq!(max_rel_diff(&[-4.0, 2.0], &[-4.0, 3.0], 1e-12), 0.25);
        assert!(same_bits(&[0.0, 1.0], &[0.0, 1.0]));
        assert!(!same_bits(&[0.0], &[-0.0]));
        assert!(!same_bits(&[1.0], &[1.0, 2.0]));
    }

    #[test]
    #[should_panic(expected = "different lengths")]
    fn different_lengths_are_a_bug() {
        max_abs_diff(&[1.0], &[1.0, 2.0]);
    }
}
