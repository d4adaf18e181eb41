//! The admin endpoint's metrics, as the serve suite reads them: an OpenMetrics exposition
//! parsed into samples, summed by name over their labels.

use std::net::SocketAddr;

use anyhow::{Result, bail};

use super::REQUEST_TIMEOUT;
use super::http::get;

/// Samples of an OpenMetrics exposition: (name, labels, value).
pub(crate) struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let name_end = line.find(['{', ' '])?;
                let (name, rest) = line.split_at(name_end);
                let (labels, rest) = match rest.strip_prefix('{') {
                    Some(rest) => {
                        let close = rest.find('}')?;
                        (&rest[..close], &rest[close + 1..])
                    }
                    None => ("", rest),
                };
                let value = rest.split_whitespace().next()?.parse().ok()?;
                Some((name.to_owned(), labels.to_owned(), value))
            })
            .collect();
        Self(samples)
    }

    /// The sum of every sample named `name` (0 when none is).
    pub(crate) fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// `GET /metrics` on the admin address.
pub(crate) fn scrape(admin: SocketAddr) -> Result<Metrics> {
    let response = get(admin, "/metrics", REQUEST_TIMEOUT)?;
    if response.status != 200 {
        bail!("GET /metrics answered {}", response.status);
    }
    Ok(Metrics::parse(&String::from_utf8_lossy(&response.body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let metrics = Metrics::parse(
            "# HELP x y\nsamepage_vmas 12\nsamepage_requests_total{function=\"a\",tenant=\"t\"} 3\n\
             samepage_requests_total{function=\"b\",tenant=\"t\"} 4\n# EOF\n",
        );
        assert_eq!(metrics.sum("samepage_vmas"), 12.0);
        assert_eq!(metrics.sum("samepage_requests_total"), 7.0);
        assert_eq!(metrics.sum("samepage_requests"), 0.0);
    }
}
