//! Line charts, as SVG: PSS over time (the compare suite, `samepage run --plot`) and the
//! serve suite's cold starts over a trace.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// Plots each series (label, points of (seconds, MiB)) on one chart at `path`.
pub fn pss_over_time(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    lines(
        path,
        title,
        ("seconds since merging began", "PSS (MiB)"),
        series,
        // A run that ended early stays where it ended: draw it on to the right edge.
        true,
        SeriesLabelPosition::UpperRight,
    )
}

/// Plots each series (label, points) as lines on one chart at `path`, with the axes
/// described as `axes` (x, y) and the legend at `legend`; with `hold`, each series is drawn
/// on at its last value to the right edge.
pub fn lines<L: AsRef<str>>(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    series: &[(L, Vec<(f64, f64)>)],
    hold: bool,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let max_x = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(0.1, f64::max);
    let max_y = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y * 1.1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(axes.0)
        .y_desc(axes.1)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for ((label, points), colour) in series.iter().zip(colours.iter().cycle()) {
        let colour = *colour;
        let held = points.last().filter(|_| hold).map(|&(_, y)| (max_x, y));
        chart
            .draw_series(LineSeries::new(
                points.iter().copied().chain(held),
                colour.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(label.as_ref())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
