//! The serve suite's trace of arrivals: Poisson arrivals, each to a function drawn by Zipf
//! popularity, from a seeded splitmix64, so that every run sends the same trace.

/// Functions of the trace (all the same component, on routes /f0 … /f7).
pub(crate) const TRACE_FUNCTIONS: usize = 8;
/// The trace's mean rate (Poisson arrivals) and the Zipf exponent of the functions'
/// popularity (function k, from 0, is drawn with weight 1 / (k + 1)^s).
pub(crate) const TRACE_RATE: f64 = 30.0;
pub(crate) const TRACE_ZIPF_S: f64 = 1.0;
pub(crate) const TRACE_SEED: u64 = 0x5a3e_9a9e_2026_0001;

/// One scheduled request: when (seconds from the trace's start) and to which function.
#[derive(Clone, Copy)]
pub(crate) struct Arrival {
    pub(crate) at: f64,
    pub(crate) function: usize,
}

/// The trace, the same every run: Poisson arrivals at [`TRACE_RATE`], functions drawn by
/// Zipf popularity.
pub(crate) fn schedule(requests: usize) -> Vec<Arrival> {
    schedule_over(requests, TRACE_FUNCTIONS, TRACE_RATE, TRACE_SEED)
}

/// A trace of `requests` Poisson arrivals at `rate` a second over `functions` functions
/// drawn by Zipf popularity (exponent [`TRACE_ZIPF_S`]), from `seed`.
pub(crate) fn schedule_over(
    requests: usize,
    functions: usize,
    rate: f64,
    seed: u64,
) -> Vec<Arrival> {
    let mut rng = SplitMix64(seed);
    let weights: Vec<f64> = (1..=functions)
        .map(|rank| 1.0 / (rank as f64).powf(TRACE_ZIPF_S))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut sum = 0.0;
    for weight in &weights {
        sum += weight / total;
        cdf.push(sum);
    }
    let mut at = 0.0;
    (0..requests)
        .map(|_| {
            at += -(1.0 - rng.unit()).ln() / rate;
            let u = rng.unit();
            let function = cdf.iter().position(|&c| u < c).unwrap_or(functions - 1);
            Arrival { at, function }
        })
        .collect()
}

/// splitmix64 (Steele, Lea and Flood): a seeded generator, enough for a trace.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_is_the_same_every_time_and_zipf_ordered() {
        let (a, b) = (schedule(2000), schedule(2000));
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.at == y.at && x.function == y.function)
        );
        let mut counts = [0usize; TRACE_FUNCTIONS];
        for arrival in &a {
            counts[arrival.function] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[TRACE_FUNCTIONS - 1]);
        let mean_gap = a.last().unwrap().at / a.len() as f64;
        assert!((mean_gap * TRACE_RATE - 1.0).abs() < 0.1, "{mean_gap}");
    }
}
