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

/// One evaluated configuration on the accuracy / time-to-first-token plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub ttft_ms: f64,
    pub accuracy: f64,
}

/// Indices of the Pareto front: configurations no other one beats on both TTFT (lower) and
/// accuracy (higher), by ascending TTFT.
pub fn pareto_front(points: &[Point]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len()).collect();
    idx.sort_by(|&a, &b| {
        points[a].ttft_ms.total_cmp(&points[b].ttft_ms).then(points[b].accuracy.total_cmp(&points[a].accuracy))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in idx {
        if points[i].accuracy > best {
            best = points[i].accuracy;
            front.push(i);
        }
    }
    front
}

/// Accuracy against mean TTFT, one labelled point per configuration, the Pareto front as a line.
pub fn accuracy_vs_ttft(path: &Path, title: &str, points: &[Point]) -> Result<()> {
    if points.is_empty() {
        return Err(anyhow!("no configurations to plot"));
    }
    let xmax = points.iter().map(|p| p.ttft_ms).fold(1.0f64, f64::max) * 1.1;
    let ymin = (points.iter().map(|p| p.accuracy).fold(100.0f64, f64::min) - 5.0).max(0.0);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, ymin..100f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("mean TTFT (ms)").y_desc("accuracy (%)").draw().map_err(|e| anyhow!("{e}"))?;
    let front: Vec<(f64, f64)> =
        pareto_front(points).into_iter().map(|i| (points[i].ttft_ms, points[i].accuracy)).collect();
    chart
        .draw_series(LineSeries::new(front, RED.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    for p in points {
        let at = (p.ttft_ms, p.accuracy);
        chart.draw_series(std::iter::once(Circle::new(at, 4, BLUE.filled()))).map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(std::iter::once(Text::new(p.label.clone(), at, ("sans-serif", 11))))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_undominated_configurations() {
        let p = |label: &str, ttft_ms, accuracy| Point { label: label.into(), ttft_ms, accuracy };
        let points = vec![p("full", 100.0, 92.0), p("a", 50.0, 88.0), p("b", 60.0, 85.0), p("c", 40.0, 80.0)];
        assert_eq!(pareto_front(&points), vec![3, 1, 0]);
        let out = std::env::temp_dir().join(format!("glimpse-front-{}.svg", std::process::id()));
        accuracy_vs_ttft(&out, "test", &points).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        assert!(svg.contains("<svg") && svg.contains("Pareto front"));
    }
}
