//! SVG plots of profile sweeps (plotters).

use std::path::Path;

use anyhow::{anyhow, Result};
use glimpse_runtime::profile::ProfileRow;
use plotters::prelude::*;

/// Latency of each stage against keep ratio, one line per stage and (backend, method).
pub fn latency_vs_keep(path: &Path, rows: &[ProfileRow]) -> Result<()> {
    let points: Vec<(&ProfileRow, f64)> =
        rows.iter().filter_map(|r| r.keep.parse::<f64>().ok().filter(|k| *k <= 1.0).map(|k| (r, k))).collect();
    if points.is_empty() {
        return Err(anyhow!("no ratio budgets to plot (use --keep ratios like 1.0,0.5,0.25)"));
    }
    let stages = ["encode", "prefill", "ttft", "decode", "select"];
    let ymax = points
        .iter()
        .flat_map(|(r, _)| stages.iter().filter_map(|s| r.stages.get(*s).map(|x| x.median_ms)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Glimpse: latency by stage vs visual tokens kept", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1.05f64, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("keep ratio").y_desc("median latency (ms)").draw().map_err(|e| anyhow!("{e}"))?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (r, k) in &points {
        for s in stages {
            let Some(v) = r.stages.get(s) else { continue };
            let name = format!("{} {} {s}", r.backend, r.method);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((*k, v.median_ms)),
                None => series.push((name, vec![(*k, v.median_ms)])),
            }
        }
    }
    for (i, (name, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
