//! On-device profiling: every stage of the pipeline timed over repeated runs (median, min,
//! max), token counts, peak memory, and efficiency against counted work and calibrated limits.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::calibrate::Calibration;
use crate::cost::{TextShape, VisionShape};
use crate::error::Result;
use crate::folder::Part;
use crate::generate::GenerationOptions;
use crate::pipeline::{ImageInput, Pipeline, Quiet, Request, Stage};

/// Stage names in pipeline order, as they appear in reports.
pub const STAGES: [Stage; 8] = Stage::ALL;

/// Median, minimum and maximum of one measurement over the runs, ms.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    /// From samples in ms.
    pub fn of(mut v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread { median_ms: 0.0, min_ms: 0.0, max_ms: 0.0 };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { median_ms: median, min_ms: v[0], max_ms: v[n - 1] }
    }
}

/// Work and efficiency of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Efficiency {
    /// FLOPs of the vision encoder over all views.
    pub encode_flops: f64,
    /// FLOPs of the prefill over the prompt.
    pub prefill_flops: f64,
    /// Achieved GFLOP/s in encode and prefill (median times).
    pub encode_gflops: f64,
    pub prefill_gflops: f64,
    /// Bytes a decode step reads (decoder weights + KV cache at the final context).
    pub decode_bytes_per_token: f64,
    /// Achieved GB/s in decode.
    pub decode_gb_s: f64,
    /// Fractions of the calibrated peaks, when calibrated.
    pub prefill_efficiency: Option<f64>,
    pub encode_efficiency: Option<f64>,
    pub decode_efficiency: Option<f64>,
}

/// One profiled configuration (backend × method × keep).
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub backend: String,
    /// Dtype variant loaded: one name, or `vision/embed/decoder` when the parts differ.
    pub dtype: String,
    pub method: String,
    pub keep: String,
    /// What acted before or inside the encoder (`all`: nothing; `t2` tiles, `r0.25` regions,
    /// `m8` merging, joined by `+`).
    pub reduction: String,
    /// Vision encoder form run: `monolithic` or `staged` (`docs/stages.md`).
    pub encoder: String,
    /// Views encoded as one batch (`batch`) or `one-by-one`.
    pub views_run: String,
    /// Per vision encoder session, the input shapes the backend held a plan for exactly after
    /// the runs (tract: every part but region skipping's embed stage and groups); empty lists:
    /// a plan for symbolic shapes.
    pub encoder_plans: Vec<Vec<String>>,
    pub views: usize,
    pub visual_tokens: usize,
    pub visual_tokens_kept: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// What the prompt compressor did on the last timed run, when one is loaded (its time is
    /// the `prompt_compress` stage, part of `ttft`).
    pub prompt_compression: Option<crate::pipeline::PromptCompressionStats>,
    /// Per-stage spread, plus `encode_per_view`, `ttft`, `stage_sum` and `end_to_end`.
    pub stages: BTreeMap<String, Spread>,
    /// Decode speed from the median decode time, tokens/s (tokens after the first).
    pub decode_tokens_per_s: f64,
    /// Median over runs of |stage sum − end to end| / end to end.
    pub accounting_gap: f64,
    pub efficiency: Efficiency,
    /// Resident memory per stage, measured on the first run (the warm-up when there is one:
    /// first-run allocations are where the peaks are); empty off Linux.
    pub memory: Vec<StageMemory>,
}

/// Resident memory of one stage of one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageMemory {
    /// The stage's name (`encode`, `prefill`, ...).
    pub stage: String,
    /// Peak resident bytes while the stage ran (Linux `VmHWM` over the stage; since the run
    /// started when peaks cannot be reset).
    pub peak_bytes: u64,
    /// Resident bytes when the stage ended.
    pub rss_after: u64,
}

/// Records each stage's peak and resident memory, starting a new peak window per stage.
#[derive(Default)]
struct StagePeaks(Vec<StageMemory>);

impl crate::pipeline::Observer for StagePeaks {
    fn stage(&mut self, stage: Stage, _took: Duration) {
        if let (Some(peak_bytes), Some(rss_after)) = (crate::memory::peak_since_reset(), crate::memory::rss_bytes()) {
            self.0.push(StageMemory { stage: stage.name().into(), peak_bytes, rss_after });
        }
        crate::memory::reset_peak();
    }
}

/// How to profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub warmup: usize,
    pub runs: usize,
    /// Decode length: generation ignores EOS so every run decodes the same number of tokens.
    pub new_tokens: usize,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions { warmup: 1, runs: 3, new_tokens: 8 }
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`, across the per-step resets of
/// [`crate::memory::reset_peak`]), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    crate::memory::process_peak()
}

/// Bytes of a model part on disk, external data included.
pub fn part_bytes(pipeline: &Pipeline, part: Part, dtype: crate::folder::Dtype) -> u64 {
    crate::memory::file_bytes(&pipeline.folder.part_file(part, dtype))
}

/// Profiles the pipeline's current selection setup: `warmup` untimed runs, then `runs` timed.
pub fn profile(
    pipeline: &Pipeline,
    image: &Path,
    prompt: &str,
    opts: &ProfileOptions,
    calibration: Option<&Calibration>,
    progress: &mut dyn FnMut(),
) -> Result<ProfileRow> {
    let gen = GenerationOptions { max_new_tokens: opts.new_tokens, ignore_eos: true, ..Default::default() };
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut gaps = Vec::new();
    let mut last = None;
    let mut memory = Vec::new();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for run in 0..opts.warmup + opts.runs {
        let request = Request::new(prompt).with_image(ImageInput::Path(image));
        let start;
        let answer;
        if run == 0 {
            // the memory run: a peak window per stage (its resets cost a page-table walk each)
            let mut peaks = StagePeaks::default();
            crate::memory::reset_peak();
            start = Instant::now();
            answer = pipeline.answer(&request, &gen, &mut peaks)?;
            memory = peaks.0;
        } else {
            start = Instant::now();
            answer = pipeline.answer(&request, &gen, &mut Quiet)?;
        }
        let e2e = start.elapsed();
        progress();
        if run < opts.warmup {
            continue;
        }
        let t = answer.stats.times;
        let views = answer.stats.views;
        for stage in STAGES {
            samples.entry(stage.name().into()).or_default().push(ms(t.get(stage)));
        }
        samples.entry("encode_per_view".into()).or_default().push(ms(t.encode) / views.max(1) as f64);
        if answer.stats.encoder_stages.len() > 1 {
            let mut sum = 0.0;
            for (name, took) in &answer.stats.encoder_stages {
                samples.entry(format!("encode:{name}")).or_default().push(ms(*took));
                sum += ms(*took);
            }
            samples.entry("encode_stage_sum".into()).or_default().push(sum);
        }
        samples.entry("ttft".into()).or_default().push(ms(t.ttft()));
        samples.entry("stage_sum".into()).or_default().push(ms(t.total()));
        samples.entry("end_to_end".into()).or_default().push(ms(e2e));
        gaps.push((ms(e2e) - ms(t.total())).abs() / ms(e2e).max(1e-9));
        last = Some(answer.stats);
    }
    let stats = last.unwrap_or_default();
    let stages: BTreeMap<String, Spread> = samples.into_iter().map(|(k, v)| (k, Spread::of(v))).collect();
    let med = |k: &str| stages.get(k).map_or(0.0, |s| s.median_ms);
    let decode_tokens_per_s = if stats.new_tokens > 1 && med("decode") > 0.0 {
        (stats.new_tokens - 1) as f64 / (med("decode") / 1e3)
    } else {
        0.0
    };
    let views = stats.views;
    let efficiency = efficiency(pipeline, &stats, views, &stages, calibration)?;
    let dtypes: Vec<&str> = pipeline.parts().iter().map(|(_, d)| d.name()).collect();
    let dtype = if dtypes.iter().all(|d| *d == dtypes[0]) { dtypes[0].to_string() } else { dtypes.join("/") };
    Ok(ProfileRow {
        backend: pipeline.backend_name().into(),
        dtype,
        method: pipeline.selection().method.clone(),
        keep: pipeline.selection().budget.to_string(),
        reduction: "all".into(),
        encoder: if pipeline.encoder_is_staged() { "staged" } else { "monolithic" }.into(),
        views_run: if pipeline.encodes_views_one_by_one() { "one-by-one" } else { "batch" }.into(),
        encoder_plans: pipeline.encoder_fixed_plans(),
        views,
        visual_tokens: stats.visual_tokens,
        visual_tokens_kept: stats.visual_tokens_kept,
        prompt_tokens: stats.prompt_tokens,
        new_tokens: stats.new_tokens,
        prompt_compression: stats.prompt_compression.clone(),
        stages,
        decode_tokens_per_s,
        accounting_gap: Spread::of(gaps).median_ms,
        efficiency,
        memory,
    })
}

fn efficiency(
    pipeline: &Pipeline,
    stats: &crate::pipeline::GenerationStats,
    views: usize,
    stages: &BTreeMap<String, Spread>,
    cal: Option<&Calibration>,
) -> Result<Efficiency> {
    let text = TextShape::from_folder(&pipeline.folder)?;
    let vision = VisionShape::from_folder(&pipeline.folder, pipeline.family.name())?;
    let med = |k: &str| stages.get(k).map_or(0.0, |s| s.median_ms / 1e3);
    let encode_flops = vision.flops_per_view() * views as f64;
    let prefill_flops = text.prefill_flops(stats.prompt_tokens, 0);
    let weights = part_bytes(pipeline, Part::Decoder, pipeline.part_dtype(Part::Decoder)) as f64;
    let ctx = stats.prompt_tokens + stats.new_tokens;
    let decode_bytes_per_token = weights + text.kv_bytes(ctx, 4);
    let rate = |work: f64, secs: f64| if secs > 0.0 { work / secs } else { 0.0 };
    let encode_gflops = rate(encode_flops, med("encode")) / 1e9;
    let prefill_gflops = rate(prefill_flops, med("prefill")) / 1e9;
    let per_token = if stats.new_tokens > 1 { med("decode") / (stats.new_tokens - 1) as f64 } else { 0.0 };
    let decode_gb_s = rate(decode_bytes_per_token, per_token) / 1e9;
    Ok(Efficiency {
        encode_flops,
        prefill_flops,
        encode_gflops,
        prefill_gflops,
        decode_bytes_per_token,
        decode_gb_s,
        prefill_efficiency: cal.map(|c| prefill_gflops / c.gemm_gflops),
        encode_efficiency: cal.map(|c| encode_gflops / c.gemm_gflops),
        decode_efficiency: cal.map(|c| decode_gb_s / c.bandwidth_gb_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_min_max() {
        assert_eq!(Spread::of(vec![3.0, 1.0, 2.0]), Spread { median_ms: 2.0, min_ms: 1.0, max_ms: 3.0 });
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).median_ms, 2.5);
    }
}
