//! The straight line of one request: image → preprocess → encode (with tile skipping) → select →
//! splice → prefill → decode, each stage timed and reported to the observer.

use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::Array2;

use super::{
    original_positions, pool_fits, Answer, Encoded, EncodedImage, GenerationStats, ImageInput, KeptLayout, Observer,
    OnText, Pipeline, Positions, PrefixCache, Prepared, PromptCompressionStats, Request, Stage, StageTimes,
};
use crate::error::{Error, Result};
use crate::family::{self, View, ViewKind, VisionInput};
use crate::generate::{GenerationOptions, Generator, StopReason};
use crate::select::{Selection, SelectionInput, Selector};

/// Sets a stage's time and tells the observer.
fn record(times: &mut StageTimes, stage: Stage, took: Duration, obs: &mut dyn Observer) {
    *times.slot_mut(stage) = took;
    obs.stage(stage, took);
}

/// Stops the request when the observer asks to, naming what ran last.
fn checkpoint(obs: &mut dyn Observer, after: &str) -> Result<()> {
    if obs.cancelled() {
        return Err(Error::Cancelled { after: after.to_string() });
    }
    Ok(())
}

/// Per-request state: the prompt's text embeddings are computed at most once, whichever stage
/// (tile scoring, a text-guided method) asks first.
struct Scratch<'a> {
    prompt: &'a str,
    text: Option<Array2<f32>>,
}

impl Pipeline {
    /// Answers one request: every stage in order, each timed and reported to `obs`, the answer
    /// streamed to `obs` as it is generated.
    pub fn answer(&self, req: &Request<'_>, opts: &GenerationOptions, obs: &mut dyn Observer) -> Result<Answer> {
        self.answer_with(req, opts, obs, None)
    }

    /// [`Pipeline::answer`] that prefills only from the first prompt token that differs from
    /// the one `cache` holds (a standing question about the next camera frame), then keeps this
    /// prompt's cache there. The answer equals [`Pipeline::answer`]'s up to float rounding; the
    /// tokens taken from the cache are in [`GenerationStats::kv_tokens_reused`].
    pub fn answer_reusing(
        &self,
        req: &Request<'_>,
        opts: &GenerationOptions,
        obs: &mut dyn Observer,
        cache: &mut PrefixCache,
    ) -> Result<Answer> {
        self.answer_with(req, opts, obs, Some(cache))
    }

    fn answer_with(
        &self,
        req: &Request<'_>,
        opts: &GenerationOptions,
        obs: &mut dyn Observer,
        cache: Option<&mut PrefixCache>,
    ) -> Result<Answer> {
        // the pipeline's own selection was checked when it was set; a request's own is checked here
        let custom = match &req.selection {
            Some((config, positions)) => {
                pool_fits(config, &self.decoder_io)?;
                Some((Selector::new(config.clone())?, *positions))
            }
            None => None,
        };
        let (selector, positions) = custom.as_ref().map_or((&self.selector, self.positions), |(s, p)| (s, *p));
        let reduction = match &req.reduction {
            Some(r) => {
                self.check_reduction(r)?;
                if r.is_active() && matches!(req.image, ImageInput::Encoded(_)) {
                    return Err(Error::invalid(
                        "reduction",
                        "an encoded image",
                        "a request's own encoder reduction needs the image, not an encoding made without it",
                    ));
                }
                *r
            }
            None => self.reduction(),
        };
        let mut times = StageTimes::default();
        checkpoint(obs, "nothing (it never started)")?;
        let (compressed, prompt_compression) = self.compress_prompt(req.prompt, &mut times, obs)?;
        let prompt = compressed.as_deref().unwrap_or(req.prompt);
        let mut scratch = Scratch { prompt, text: None };
        let decoded;
        let image = match req.image {
            ImageInput::None => None,
            ImageInput::Path(path) => {
                let started = Instant::now();
                decoded = self.load_image(path)?;
                record(&mut times, Stage::ImageDecode, started.elapsed(), obs);
                Some(&decoded)
            }
            ImageInput::Bytes { bytes, name } => {
                let started = Instant::now();
                decoded = crate::preprocess::decode_image(bytes, Path::new(name), self.image_limits)?;
                record(&mut times, Stage::ImageDecode, started.elapsed(), obs);
                Some(&decoded)
            }
            ImageInput::Decoded(img) => Some(img),
            ImageInput::Encoded(_) => None,
        };
        let started = Instant::now();
        let rendered = self.render_turns(req.history, prompt, !matches!(req.image, ImageInput::None))?;
        let render_time = started.elapsed();
        let mut encoder_stages = Vec::new();
        let prepared = match (req.image, image) {
            (ImageInput::None, _) => {
                let started = Instant::now();
                let ids = self.expand_and_tokenize(&rendered, None)?;
                let prepared = self.splice(ids, None, 0, None)?;
                record(&mut times, Stage::Splice, render_time + started.elapsed(), obs);
                prepared
            }
            (ImageInput::Encoded(e), _) => {
                record(&mut times, Stage::Preprocess, e.preprocess, obs);
                record(&mut times, Stage::Encode, e.encode, obs);
                encoder_stages.clone_from(&e.encoded.stages);
                self.select_and_splice(
                    &rendered,
                    render_time,
                    &e.input,
                    &e.encoded,
                    selector,
                    positions,
                    &mut scratch,
                    &mut times,
                    obs,
                )?
            }
            (_, Some(img)) => {
                if let Some(n) = self.family.planned_tokens(img.width(), img.height()) {
                    let (context, field) = &self.context;
                    if n >= *context {
                        let field = field.clone();
                        return Err(Error::ContextOverflow { tokens: n, image_tokens: n, context: *context, field });
                    }
                }
                let started = Instant::now();
                let input = self.preprocess(img)?;
                record(&mut times, Stage::Preprocess, started.elapsed(), obs);
                let started = Instant::now();
                let encoded = if reduction.is_active() {
                    let mut text = || self.scratch_text(&mut scratch).cloned();
                    self.encode_reduced_with(&input, &mut text, &reduction)?
                } else {
                    self.encode(&input)?
                };
                record(&mut times, Stage::Encode, started.elapsed(), obs);
                checkpoint(obs, Stage::Encode.name())?;
                encoder_stages.clone_from(&encoded.stages);
                self.select_and_splice(
                    &rendered,
                    render_time,
                    &input,
                    &encoded,
                    selector,
                    positions,
                    &mut scratch,
                    &mut times,
                    obs,
                )?
            }
            (_, None) => return Err(Error::interface("pipeline", "image input without an image")),
        };
        let (prompt_tokens, visual, kept, views) =
            (prepared.input_ids.len(), prepared.visual_tokens, prepared.visual_tokens_kept, prepared.views);
        let layout = prepared.layout.clone();
        checkpoint(obs, Stage::Splice.name())?;
        let (ids, stop, kv_tokens_reused) = match cache {
            Some(cache) => self.generate_reusing(prepared, opts, &mut times, obs, cache)?,
            None => {
                let (ids, stop) = self.generate(prepared, opts, &mut times, obs)?;
                (ids, stop, 0)
            }
        };
        let started = Instant::now();
        let text = self.tokenizer.decode(&ids)?;
        times.decode += started.elapsed();
        obs.stage(Stage::Decode, times.decode);
        let decode_s = times.decode.as_secs_f64();
        let stats = GenerationStats {
            times,
            ttft_ms: times.ttft().as_secs_f64() * 1e3,
            prompt_tokens,
            visual_tokens: visual,
            visual_tokens_kept: kept,
            views,
            new_tokens: ids.len(),
            decode_tokens_per_s: if ids.len() > 1 && decode_s > 0.0 { (ids.len() - 1) as f64 / decode_s } else { 0.0 },
            stop,
            encoder_stages,
            prompt_compression,
            kv_tokens_reused,
        };
        Ok(Answer { text, token_ids: ids, stats, layout })
    }

    /// The prompt compressor's stage: the shortened prompt and what it did (`None`, `None`
    /// without a compressor). The token counts for the report are taken outside the timed part.
    fn compress_prompt(
        &self,
        prompt: &str,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<(Option<String>, Option<PromptCompressionStats>)> {
        let Some((compressor, options)) = &self.compressor else {
            return Ok((None, None));
        };
        let started = Instant::now();
        let c = compressor.compress(prompt, options)?;
        record(times, Stage::PromptCompress, started.elapsed(), obs);
        let stats = PromptCompressionStats {
            text_tokens_before: self.tokenizer.encode_plain(prompt)?.len(),
            text_tokens_after: self.tokenizer.encode_plain(&c.text)?.len(),
            cl100k_tokens_before: c.origin_tokens,
            cl100k_tokens_after: c.compressed_tokens,
            prompt: c.text.clone(),
        };
        Ok((Some(c.text), Some(stats)))
    }

    /// [`Pipeline::answer`] for the common case: an optional image file, text streamed to a
    /// closure.
    pub fn ask(
        &self,
        image: Option<&Path>,
        prompt: &str,
        opts: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let req = Request::new(prompt).with_image(image.map_or(ImageInput::None, ImageInput::Path));
        self.answer(&req, opts, &mut OnText(on_text))
    }

    /// Preprocesses and encodes an image once, to ask several prompts about it with
    /// [`ImageInput::Encoded`] (`glimpse eval` asks about eight questions per picture), with
    /// the reductions that do not depend on the prompt (merging; region skipping by saliency on
    /// single-view models). Not available when tile or region skipping is guided by the prompt.
    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        if self.encoding_depends_on_prompt() {
            return Err(Error::invalid(
                "tile / region skipping",
                "on",
                "the tokens encoded depend on the prompt, so one encoding cannot serve several prompts",
            ));
        }
        let started = Instant::now();
        let input = self.preprocess(image)?;
        let preprocess = started.elapsed();
        let started = Instant::now();
        let encoded = if self.reduces_encoder() {
            let mut no_text = || Err(Error::interface("pipeline", "prompt-guided reduction without a prompt"));
            self.encode_reduced(&input, &mut no_text)?
        } else {
            self.encode(&input)?
        };
        Ok(EncodedImage { input, encoded, preprocess, encode: started.elapsed() })
    }

    /// The prompt's text embeddings, computed on first use within a request.
    fn scratch_text<'s>(&self, scratch: &'s mut Scratch<'_>) -> Result<&'s Array2<f32>> {
        if scratch.text.is_none() {
            scratch.text = Some(self.text_embeddings(scratch.prompt)?);
        }
        scratch.text.as_ref().ok_or_else(|| Error::interface("pipeline", "text embeddings"))
    }

    /// Chooses which rows reach the language model; computes the prompt's text embeddings
    /// first when the method needs them.
    pub fn select(&self, encoded: &Encoded, input: &VisionInput, prompt: &str) -> Result<Selection> {
        let mut scratch = Scratch { prompt, text: None };
        self.select_with(&self.selector, encoded, input, &mut scratch)
    }

    fn select_with(
        &self,
        selector: &Selector,
        encoded: &Encoded,
        input: &VisionInput,
        scratch: &mut Scratch<'_>,
    ) -> Result<Selection> {
        let mut signals = encoded.signals.clone();
        if selector.needs().text {
            signals.text = Some(self.scratch_text(scratch)?.clone());
        }
        let sel = match &encoded.present {
            None => selector.select(&SelectionInput {
                features: &encoded.features,
                views: &input.views,
                signals: &signals,
            })?,
            Some(present) => select_present(selector, encoded, &input.views, present, &signals)?,
        };
        if sel.kept.len() != input.views.len() {
            return Err(Error::interface("select", "selector returned a different number of views"));
        }
        Ok(sel)
    }

    /// Selection, prompt expansion and splice after the encoder.
    #[allow(clippy::too_many_arguments)]
    fn select_and_splice(
        &self,
        rendered: &str,
        render_time: Duration,
        input: &VisionInput,
        encoded: &Encoded,
        selector: &Selector,
        positions: Positions,
        scratch: &mut Scratch<'_>,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<Prepared> {
        let started = Instant::now();
        let sel = self.select_with(selector, encoded, input, scratch)?;
        let kept_rows = sel.gather(&encoded.features, &input.views);
        times.select = started.elapsed();
        obs.stage(Stage::Select, times.select);
        let started = Instant::now();
        let ids = self.expand_and_tokenize(rendered, Some((input, &sel.counts())))?;
        let positions = match positions {
            Positions::Contiguous => None,
            Positions::Original => Some(original_positions(&ids, self.family.image_token_id(), input, &sel)?),
        };
        let mut prepared = self.splice(ids, Some(&kept_rows), input.total_tokens(), positions)?;
        if let Some(bias) = sel.key_bias() {
            self.weigh_rows(&mut prepared, &bias)?;
        }
        let never = |v: usize| encoded.encoded.as_ref().is_some_and(|e| !e[v]);
        prepared.views = input.encoder_views() - (0..input.views.len()).filter(|&v| never(v)).count();
        let skipped_tiles = input
            .views
            .iter()
            .enumerate()
            .filter(|&(v, view)| matches!(view.kind, ViewKind::Tile { .. }) && never(v))
            .map(|(_, view)| view.clone())
            .collect();
        prepared.layout = Some(KeptLayout {
            views: input.views.clone(),
            kept: sel.kept.clone(),
            skipped_tiles,
            present: encoded.present.clone(),
            merged: encoded.merged.clone(),
        });
        drop((sel, kept_rows));
        times.splice = render_time + started.elapsed();
        obs.stage(Stage::Splice, times.splice);
        Ok(prepared)
    }

    /// Runs the prefill alone and returns the last position's logits (used by parity tests and
    /// profiling).
    pub fn prefill_logits(&self, prepared: &Prepared) -> Result<ndarray::Array1<f32>> {
        let mut cache = self.decoder_io.empty_cache()?;
        let (embeds, bias) = (prepared.embeds.clone(), prepared.key_bias.as_deref());
        self.decoder_io.step_biased(self.decoder.as_ref(), embeds, &prepared.positions, bias, &mut cache)
    }

    /// Prefill then decode until EOS, the token budget or the context, streaming to `obs`.
    pub fn generate(
        &self,
        prepared: Prepared,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<(Vec<i64>, StopReason)> {
        self.generator().run(prepared.embeds, &prepared.positions, prepared.key_bias.as_deref(), opts, times, obs)
    }

    /// The prefill + decode loop over this pipeline's decoder, embeddings and tokenizer.
    pub(crate) fn generator(&self) -> Generator<'_> {
        Generator {
            io: &self.decoder_io,
            decoder: self.decoder.as_ref(),
            embed: self.embed.as_ref(),
            tokenizer: &self.tokenizer,
            eos: &self.eos,
            context: self.context.0,
        }
    }
}

/// Selection among the rows that exist after tile or region skipping: the selector sees only
/// them (views of their sizes; a view keeps its grid only when whole), and its choice is mapped
/// back to indices in the full views.
fn select_present(
    selector: &Selector,
    encoded: &Encoded,
    views: &[View],
    present: &[Vec<usize>],
    signals: &crate::select::Signals,
) -> Result<Selection> {
    if present.len() != views.len() || present.iter().zip(views).any(|(p, v)| p.iter().any(|&i| i >= v.tokens)) {
        return Err(Error::interface("select", "rows present do not match the views"));
    }
    let live: Vec<usize> = (0..views.len()).filter(|&v| !present[v].is_empty()).collect();
    let mut rows = Vec::new();
    let mut sub_views = Vec::with_capacity(live.len());
    let starts = family::view_starts(views);
    for &v in &live {
        rows.extend(present[v].iter().map(|&i| starts[v] + i));
        let n = present[v].len();
        let grid = if n == views[v].tokens { views[v].grid } else { (1, n) };
        sub_views.push(View { tokens: n, grid, ..views[v].clone() });
    }
    let features = encoded.features.select(ndarray::Axis(0), &rows);
    let mut sub_signals = signals.select_rows(&rows);
    sub_signals.text.clone_from(&signals.text);
    let sub = selector.select(&SelectionInput { features: &features, views: &sub_views, signals: &sub_signals })?;
    let mut sel = Selection { kept: vec![Vec::new(); views.len()], ..Default::default() };
    for (k, &v) in live.iter().enumerate() {
        sel.kept[v] = sub.kept[k].iter().map(|&i| present[v][i]).collect();
    }
    for ((k, i), row) in sub.replaced {
        sel.replaced.insert((live[k], present[live[k]][i]), row);
    }
    for ((k, i), w) in sub.weights {
        sel.weights.insert((live[k], present[live[k]][i]), w);
    }
    Ok(sel)
}
