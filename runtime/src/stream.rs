//! Camera streams with temporal reuse: a standing prompt asked about frame after frame, where
//! only the views (SmolVLM tiles and global view; the whole picture on single-view families)
//! whose pixels changed go through the vision encoder again, and the prompt prefix that did
//! not change keeps its KV cache ([`PrefixCache`]). A latency budget (`max_latency`) caps how
//! many changed views a frame re-encodes, from the stage costs measured on earlier frames; the
//! views left over keep their old features and stay "changed" until a later frame encodes them.
//!
//! A view changed when, in any cell of a 16 × 16 grid over it, the mean absolute difference of
//! its preprocessed pixel values from those its cached features were computed from exceeds
//! [`StreamOptions::change_threshold`] (values in the model's normalised units; SmolVLM's span
//! 2.0 from black to white). A grid rather than the whole view's mean, so that a small object
//! moving is seen while sensor noise averages out.

use std::time::{Duration, Instant};

use image::RgbImage;
use serde::Serialize;

use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::family::VisionInput;
use crate::generate::GenerationOptions;
use crate::pipeline::{Answer, Encoded, EncodedImage, ImageInput, Observer, Pipeline, PrefixCache, Request};

/// Cells per side of the change grid over each view.
const GRID: usize = 16;

/// How a [`Stream`] reuses work between frames.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StreamOptions {
    /// A view whose largest per-cell mean absolute pixel change is at or below this reuses its
    /// cached features (0: only bit-identical views).
    pub change_threshold: f32,
    /// Reuse the features of unchanged views (off: every frame is encoded whole).
    pub reuse_features: bool,
    /// Reuse the KV cache over the unchanged prompt prefix (off: every frame is prefilled whole).
    pub reuse_prefix: bool,
    /// Time-to-first-token budget per frame: changed views beyond what fits are left for later
    /// frames (most changed first). `None`: every changed view is encoded.
    pub max_latency: Option<Duration>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { change_threshold: 0.02, reuse_features: true, reuse_prefix: true, max_latency: None }
    }
}

impl StreamOptions {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.change_threshold >= 0.0 && self.change_threshold.is_finite()) {
            return Err(Error::invalid("change threshold", self.change_threshold, "must be a finite number >= 0"));
        }
        if self.max_latency.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid("max latency", "0", "must be more than 0 ms"));
        }
        Ok(())
    }
}

/// What feeding one frame did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FrameUpdate {
    /// Frame number, from 0.
    pub index: usize,
    /// Views of the frame (tiles + global view, or 1).
    pub views: usize,
    /// Views whose pixels changed past the threshold since their features were computed.
    pub views_changed: usize,
    /// Views that ran through the encoder for this frame.
    pub views_encoded: usize,
    /// Views whose cached features were used (unchanged, or changed but deferred).
    pub views_reused: usize,
    /// Changed views left with their old features to meet the latency budget.
    pub views_deferred: usize,
    /// Predicted time to first token under the budget, ms (None without a budget or before
    /// any cost was measured).
    pub predicted_ttft_ms: Option<f64>,
}

/// One frame's answer with what was reused.
#[derive(Debug, Clone)]
pub struct FrameReport {
    /// What feeding the frame did.
    pub update: FrameUpdate,
    /// The answer (its stats carry TTFT, stage times and `kv_tokens_reused`).
    pub answer: Answer,
    /// Whether the TTFT met the latency budget (None without one).
    pub deadline_met: Option<bool>,
}

/// Running averages of the stage costs the latency budget is planned from.
#[derive(Debug, Clone, Copy, Default)]
struct Costs {
    /// Encoder time per view, s.
    per_view: Option<f64>,
    /// Preprocess time, s.
    preprocess: Option<f64>,
    /// Select + splice + prefill time of the last answer with the prompt prefilled whole, s
    /// (the budget is planned as if no KV prefix were reused: conservative).
    rest: Option<f64>,
}

fn ema(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.5 * o + 0.5 * new))
}

/// The latest frame, encoded, and the pixels each view's features were computed from.
struct Cached {
    /// Per view (or one for the whole frame): the pixel values its cached features come from.
    pixels: Vec<Vec<f32>>,
    /// Layout key: the pixel tensor's shape and the views' token counts.
    layout: (Vec<usize>, Vec<usize>),
    image: EncodedImage,
}

/// A standing prompt over a sequence of frames, reusing what did not change (see the module
/// documentation). Feed frames with [`Stream::feed`] and ask with [`Stream::answer`], or both
/// at once with [`Stream::frame`].
pub struct Stream<'p> {
    pipeline: &'p Pipeline,
    prompt: String,
    opts: StreamOptions,
    cached: Option<Cached>,
    prefix: PrefixCache,
    costs: Costs,
    frames: usize,
    last: Option<FrameUpdate>,
}

impl<'p> Stream<'p> {
    /// A stream asking `prompt` about each frame.
    pub fn new(pipeline: &'p Pipeline, prompt: &str, opts: StreamOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Stream {
            pipeline,
            prompt: prompt.to_string(),
            opts,
            cached: None,
            prefix: PrefixCache::default(),
            costs: Costs::default(),
            frames: 0,
            last: None,
        })
    }

    /// Changes the standing prompt. Cached features stay unless the encoder's reduction depends
    /// on the prompt; the KV cache keeps whatever prefix the new prompt shares.
    pub fn set_prompt(&mut self, prompt: &str) {
        self.prompt = prompt.to_string();
        if self.pipeline.encoding_depends_on_prompt() {
            self.cached = None;
        }
    }

    /// Forgets every cached frame and prompt.
    pub fn reset(&mut self) {
        self.cached = None;
        self.prefix.clear();
        self.last = None;
    }

    /// The standing prompt.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// Preprocesses and encodes a frame, re-encoding only the views that changed (within the
    /// latency budget); [`Stream::answer`] then asks about it.
    pub fn feed(&mut self, frame: &RgbImage) -> Result<FrameUpdate> {
        let p = self.pipeline;
        let started = Instant::now();
        let input = p.preprocess(frame)?;
        let preprocess = started.elapsed();
        self.costs.preprocess = ema(self.costs.preprocess, preprocess.as_secs_f64());
        let (units, per_view) = view_pixels(&input)?;
        let layout = (pixel_shape(&input), input.views.iter().map(|v| v.tokens).collect::<Vec<_>>());
        let views = input.views.len();
        // the previous frame's encoding, when its layout matches and reuse is on
        let previous = self.cached.take().filter(|c| self.opts.reuse_features && c.layout == layout);
        let dims = unit_dims(&input, per_view);
        let changed: Vec<(usize, f32)> = match &previous {
            Some(c) => units
                .iter()
                .enumerate()
                .filter_map(|(u, px)| {
                    let score = change_score(&c.pixels[u], px, dims);
                    (score > self.opts.change_threshold).then_some((u, score))
                })
                .collect(),
            None => (0..units.len()).map(|u| (u, f32::INFINITY)).collect(),
        };
        let views_changed = if per_view {
            changed.len()
        } else if changed.is_empty() {
            0
        } else {
            views
        };
        let (chosen, predicted) = self.plan(&changed, previous.is_some(), per_view, views);
        let started = Instant::now();
        let (encoded, encoded_views): (Encoded, usize) = match &previous {
            Some(c) if chosen.is_empty() => (c.image.encoded.clone(), 0),
            Some(c) if per_view && !p.reduces_encoder() => {
                (p.encode_reusing(&input, &c.image.encoded, &chosen)?, chosen.len())
            }
            _ => (self.encode_whole(&input)?, views),
        };
        let encode = started.elapsed();
        if encoded_views > 0 {
            self.costs.per_view = ema(self.costs.per_view, encode.as_secs_f64() / encoded_views as f64);
        }
        // the pixels behind each view's features: new for the views encoded, old for the rest
        let pixels = match previous {
            Some(c) if encoded_views < views => {
                let mut old = c.pixels;
                for &u in &chosen {
                    old[u].clone_from(&units[u]);
                }
                old
            }
            _ => units,
        };
        let deferred = if per_view { views_changed - encoded_views.min(views_changed) } else { 0 };
        let update = FrameUpdate {
            index: self.frames,
            views,
            views_changed,
            views_encoded: encoded_views,
            views_reused: views - encoded_views,
            views_deferred: deferred,
            predicted_ttft_ms: predicted.map(|s| s * 1e3),
        };
        self.frames += 1;
        self.cached = Some(Cached { pixels, layout, image: EncodedImage { input, encoded, preprocess, encode } });
        self.last = Some(update.clone());
        Ok(update)
    }

    /// Answers the standing prompt about the latest frame fed.
    pub fn answer(&mut self, opts: &GenerationOptions, obs: &mut dyn Observer) -> Result<FrameReport> {
        let (Some(cached), Some(update)) = (&self.cached, &self.last) else {
            return Err(Error::invalid("stream", "no frame", "feed a frame before asking about it"));
        };
        let req = Request::new(&self.prompt).with_image(ImageInput::Encoded(&cached.image));
        let answer = if self.opts.reuse_prefix {
            self.pipeline.answer_reusing(&req, opts, obs, &mut self.prefix)?
        } else {
            self.pipeline.answer(&req, opts, obs)?
        };
        let t = &answer.stats.times;
        if answer.stats.kv_tokens_reused == 0 {
            let rest = (t.select + t.splice + t.prefill).as_secs_f64();
            self.costs.rest = ema(self.costs.rest, rest);
        }
        let deadline_met = self.opts.max_latency.map(|d| answer.stats.times.ttft() <= d);
        Ok(FrameReport { update: update.clone(), answer, deadline_met })
    }

    /// [`Stream::feed`] then [`Stream::answer`].
    pub fn frame(&mut self, frame: &RgbImage, opts: &GenerationOptions, obs: &mut dyn Observer) -> Result<FrameReport> {
        self.feed(frame)?;
        self.answer(opts, obs)
    }

    /// The views to encode, most changed first, within the latency budget, and the predicted
    /// TTFT (s) of that choice. Without cached features everything is encoded.
    fn plan(
        &self,
        changed: &[(usize, f32)],
        have_cache: bool,
        per_view: bool,
        views: usize,
    ) -> (Vec<usize>, Option<f64>) {
        let mut order: Vec<(usize, f32)> = changed.to_vec();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let all: Vec<usize> = order.iter().map(|&(u, _)| u).collect();
        let (Some(budget), Some(per), Some(pre), Some(rest)) =
            (self.opts.max_latency, self.costs.per_view, self.costs.preprocess, self.costs.rest)
        else {
            return (all, None);
        };
        let unit_cost = if per_view { per } else { per * views as f64 };
        let free = budget.as_secs_f64() - pre - rest;
        let fit = if unit_cost > 0.0 { (free / unit_cost).floor().max(0.0) as usize } else { all.len() };
        let take = if have_cache { fit.min(all.len()) } else { all.len() };
        let chosen: Vec<usize> = all[..take].to_vec();
        (chosen, Some(pre + rest + unit_cost * take as f64))
    }

    /// The whole frame through the encoder, with the pipeline's encoder reduction (guided by the
    /// standing prompt where it is prompt-guided).
    fn encode_whole(&self, input: &VisionInput) -> Result<Encoded> {
        let p = self.pipeline;
        if !p.reduces_encoder() {
            return p.encode(input);
        }
        let prompt = self.prompt.as_str();
        p.encode_reduced(input, &mut || p.text_embeddings(prompt))
    }
}

/// The shape of the frame's pixel tensor (empty when it has none).
fn pixel_shape(input: &VisionInput) -> Vec<usize> {
    pixel_tensor(input).map(|t| t.shape().to_vec()).unwrap_or_default()
}

fn pixel_tensor(input: &VisionInput) -> Option<&Tensor> {
    input.tensors.iter().find(|(n, _)| n == "pixel_values").map(|(_, t)| t)
}

/// The preprocessed pixels split per view (`true`) when the pixel tensor has one image per
/// view (`[1, views, C, H, W]`, or `[1, C, H, W]` for one view), else the whole tensor as one
/// unit (`false`: LLaVA-OneVision's crops are packed into views after the encoder).
fn view_pixels(input: &VisionInput) -> Result<(Vec<Vec<f32>>, bool)> {
    let t = pixel_tensor(input).ok_or_else(|| Error::interface("stream", "the preprocessor gave no pixel_values"))?;
    let values: Vec<f32> = match t {
        Tensor::F32(a) => a.iter().copied().collect(),
        Tensor::F16(a) => a.iter().map(|x| x.to_f32()).collect(),
        other => return Err(Error::interface("stream", format!("pixel_values is {}", other.elem()))),
    };
    let shape = t.shape();
    let views = input.views.len();
    let per_view = input.anyres.is_none()
        && ((shape.len() == 5 && shape[1] == views) || (shape.len() == 4 && views == 1))
        && views > 0;
    if !per_view {
        return Ok((vec![values], false));
    }
    let each = values.len() / views;
    Ok((values.chunks(each.max(1)).map(<[f32]>::to_vec).collect(), true))
}

/// `(channels, height, width)` of one unit of [`view_pixels`].
fn unit_dims(input: &VisionInput, per_view: bool) -> (usize, usize, usize) {
    let s = pixel_shape(input);
    let n = s.len();
    if n < 3 {
        return (1, 1, s.iter().product());
    }
    let (c, h, w) = (s[n - 3], s[n - 2], s[n - 1]);
    if per_view {
        (c, h, w)
    } else {
        (s[..n - 2].iter().product(), h, w)
    }
}

/// The largest per-cell mean absolute difference between two units' pixels, over a
/// [`GRID`] × [`GRID`] grid of cells (channels pooled).
fn change_score(old: &[f32], new: &[f32], (c, h, w): (usize, usize, usize)) -> f32 {
    if old.len() != new.len() || old.len() != c * h * w || h == 0 || w == 0 {
        return f32::INFINITY;
    }
    let (ch, cw) = (h.div_ceil(GRID), w.div_ceil(GRID));
    let (gh, gw) = (h.div_ceil(ch), w.div_ceil(cw));
    let mut sums = vec![0f64; gh * gw];
    let mut counts = vec![0usize; gh * gw];
    for k in 0..c {
        for y in 0..h {
            let row = (k * h + y) * w;
            let cell_row = (y / ch) * gw;
            for x in 0..w {
                let i = row + x;
                let cell = cell_row + x / cw;
                sums[cell] += f64::from((old[i] - new[i]).abs());
                counts[cell] += 1;
            }
        }
    }
    sums.iter().zip(&counts).map(|(s, &n)| if n == 0 { 0.0 } else { (s / n as f64) as f32 }).fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_change_shows_in_one_cell() {
        let (c, h, w) = (3, 64, 64);
        let old = vec![0.0f32; c * h * w];
        let mut new = old.clone();
        // a 4 × 4 patch changed by 1.0 in every channel: 16 of the 4 × 4 cell's 16 pixels
        for k in 0..c {
            for y in 8..12 {
                for x in 8..12 {
                    new[(k * h + y) * w + x] = 1.0;
                }
            }
        }
        assert_eq!(change_score(&old, &old, (c, h, w)), 0.0);
        assert!((change_score(&old, &new, (c, h, w)) - 1.0).abs() < 1e-6);
        // noise of 0.01 everywhere stays below a 0.02 threshold
        let noisy: Vec<f32> = old.iter().enumerate().map(|(i, _)| if i % 2 == 0 { 0.01 } else { -0.01 }).collect();
        assert!(change_score(&old, &noisy, (c, h, w)) <= 0.0100001);
        // a size mismatch is "everything changed"
        assert!(change_score(&old, &old[1..], (c, h, w)).is_infinite());
    }

    #[test]
    fn bad_options_are_rejected() {
        let nan = StreamOptions { change_threshold: f32::NAN, ..Default::default() };
        assert!(nan.validate().is_err());
        let zero = StreamOptions { max_latency: Some(Duration::ZERO), ..Default::default() };
        assert!(zero.validate().is_err());
        assert!(StreamOptions::default().validate().is_ok());
    }
}
