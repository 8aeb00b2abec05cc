//! Percentiles over a sorted Vec (nearest rank), the median, and the harmonic mean.

/// Nearest-rank percentile `p` (0..=100) of `sorted` (ascending); 0 when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts in place (NaN-free input) and returns p50, p95, p99.
pub(crate) fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        percentile(values, 50.0),
        percentile(values, 95.0),
        percentile(values, 99.0),
    )
}

/// The median (the mean of the two middle values for an even count); NaN when empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The harmonic mean: for rates of equal amounts of work (rows/s of rounds that each wrote the same rows), the
/// overall rate, i.e. total work ÷ total time.
pub(crate) fn harmonic_mean(rates: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = rates.len() as f64;
    n / rates.map(|r| 1.0 / r).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn median_and_harmonic_mean() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        // 100 rows at 100 rows/s and 100 rows at 50 rows/s: 200 rows in 3 s.
        assert!((harmonic_mean([100.0, 50.0].into_iter()) - 200.0 / 3.0).abs() < 1e-9);
    }
}
