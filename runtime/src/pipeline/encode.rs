//! The encode stage: the vision part on the preprocessed views, the family's post-encoder
//! packing, the registered pruning signals; and the reductions before and inside the encoder
//! ([`Pipeline::encode_reduced`]): tile and region skipping, which encode the global view first
//! and then only the tiles or patch groups [`crate::select::tiles`] / [`crate::select::regions`]
//! choose, and token merging ([`crate::select::tome`]) between the staged encoder's groups.

use std::time::Duration;

use ndarray::{Array2, Axis};

use super::vision::{add_stage_times, Chain, EncoderHook, NoReduction, VisionEncoder, VisionRun};
use super::{EncoderReduction, Pipeline};
use crate::backend::{NamedOutputs, Tensor};
use crate::error::{Error, Result};
use crate::family::{view_starts, ViewKind, VisionInput};
use crate::select::regions::{self, Keep, PatchKeep, PatchLayout, RegionSkip};
use crate::select::tiles::{self, SkippedTiles};
use crate::select::tome::{MergeConfig, Merger};
use crate::select::{signals, Signals};

/// Encoder output: feature rows and any pruning signals the export added.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Feature rows `[N, d]`, views concatenated.
    pub features: Array2<f32>,
    /// Signals read from the extra outputs named in the manifest (text is added later).
    pub signals: Signals,
    /// Wall time of each encoder stage run (`vision_embed`, `vision_blocks_K`, `vision_head`; or
    /// `vision_encoder`), summed over runs when tile skipping encodes twice.
    pub stages: Vec<(String, Duration)>,
    /// Rows that exist, per view (ascending indices into the view), when tile or region
    /// skipping left some never encoded; `None`: every row. Absent rows are zero in `features`
    /// and never reach the language model.
    pub present: Option<Vec<Vec<usize>>>,
    /// Which views ran through the encoder at all, when tile or region skipping left some out
    /// (a view whose rows all stand in from the global view was not encoded).
    pub encoded: Option<Vec<bool>>,
    /// Token merging's groups per view, when merging ran: for every patch of the view (prefix
    /// tokens left out), the merged token it ended in ([`NOT_ENCODED`] for patches region
    /// skipping left out); empty for views that were not merged.
    pub merged: Vec<Vec<u32>>,
}

/// The merge group of a patch that never entered the encoder's layers.
pub const NOT_ENCODED: u32 = u32::MAX;

/// Merge groups of one view: `sources[i]` is where the `i`-th token entering the groups
/// (`entered[i]`, an index among the view's encoder tokens) ended; the first `prefix` encoder
/// tokens are not patches.
fn merge_groups(sources: &[usize], entered: Option<&[usize]>, prefix: usize, tokens: usize) -> Vec<u32> {
    let mut out = vec![NOT_ENCODED; tokens.saturating_sub(prefix)];
    for (i, &src) in sources.iter().enumerate() {
        let t = entered.map_or(i, |e| e.get(i).copied().unwrap_or(usize::MAX));
        if t >= prefix {
            if let Some(o) = out.get_mut(t - prefix) {
                *o = src as u32;
            }
        }
    }
    out
}

/// Concatenates per-view outputs on axis 0 (rank-1 outputs, the same for every view, are taken
/// from the first run).
fn join_views(parts: Vec<Tensor>, name: &str) -> Result<Tensor> {
    let err = |e: ndarray::ShapeError| Error::interface("vision_encoder", format!("joining `{name}` per view: {e}"));
    let first = parts.first().ok_or_else(|| Error::interface("vision_encoder", "no views"))?;
    if first.shape().len() < 2 {
        return Ok(first.clone());
    }
    match first {
        Tensor::F32(_) => {
            let arrays: Vec<_> = parts.into_iter().map(|p| p.into_f32(name)).collect::<Result<_>>()?;
            let v: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            Ok(Tensor::F32(ndarray::concatenate(Axis(0), &v).map_err(err)?))
        }
        Tensor::F16(_) => {
            let arrays: Vec<_> = parts
                .into_iter()
                .map(|p| match p {
                    Tensor::F16(a) => Ok(a),
                    other => Err(Error::interface("vision_encoder", format!("`{name}` is {}", other.elem()))),
                })
                .collect::<Result<_>>()?;
            let v: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            Ok(Tensor::F16(ndarray::concatenate(Axis(0), &v).map_err(err)?))
        }
        other => Err(Error::interface("vision_encoder", format!("`{name}` is {}: not a feature output", other.elem()))),
    }
}

impl Pipeline {
    /// Encoder inputs → feature rows `[N, d]` (views concatenated) plus signals.
    pub fn encode(&self, input: &VisionInput) -> Result<Encoded> {
        self.encode_with(input, &mut NoReduction)
    }

    /// [`Pipeline::encode`] with a hook between the staged encoder's groups of layers (a
    /// monolithic encoder never calls it).
    pub fn encode_with(&self, input: &VisionInput, hook: &mut dyn EncoderHook) -> Result<Encoded> {
        self.encode_on(&self.vision, input, hook)
    }

    fn encode_on(&self, vision: &VisionEncoder, input: &VisionInput, hook: &mut dyn EncoderHook) -> Result<Encoded> {
        let given = input.inputs_for(vision.inputs(), self.family.name())?;
        // images in the encoder batch: the views, or LLaVA-OneVision's anyres crops
        let axis = self.family.views_axis();
        let views = given.first().map_or(0, |(_, t)| t.shape().get(axis).copied().unwrap_or(0));
        let run = if self.per_view && views > 1 {
            self.run_views_one_by_one(vision, given, views, hook)?
        } else {
            vision.run(given, hook)?
        };
        self.finish(vision, input, run)
    }

    /// The encoder's outputs → feature rows (the family's packing) and signals.
    fn finish(&self, vision: &VisionEncoder, input: &VisionInput, run: VisionRun) -> Result<Encoded> {
        let VisionRun { mut outputs, stages } = run;
        let first = outputs.first_name().unwrap_or_default();
        let feats = outputs
            .take("image_features")
            .or_else(|| outputs.take(&first))
            .ok_or_else(|| Error::interface("vision_encoder", "no outputs"))?
            .into_f32("vision_encoder image_features")?;
        let d = *feats.shape().last().unwrap_or(&0);
        let n = feats.len().checked_div(d).unwrap_or(0);
        let total = input.encoder_rows();
        if n != total {
            return Err(Error::interface(
                "vision_encoder",
                format!(
                    "image_features has {n} rows (shape {:?}) but the {} layout expects {total}",
                    feats.shape(),
                    self.family.name(),
                ),
            ));
        }
        let features =
            feats.into_shape_with_order((n, d)).map_err(|e| Error::interface("vision_encoder", e.to_string()))?;
        let features = self.family.pack(input, features, &mut outputs)?;
        let signals = if vision.is_staged() { Signals::default() } else { self.read_signals(&mut outputs, input)? };
        Ok(Encoded { features, signals, stages, present: None, encoded: None, merged: Vec::new() })
    }

    /// Runs the encoder once per image of its batch (inputs sliced on the family's views axis) and joins the
    /// outputs on their first axis; outputs without one per view (OneVision's `image_newline`)
    /// come from the first run.
    fn run_views_one_by_one(
        &self,
        vision: &VisionEncoder,
        given: Vec<(&str, Tensor)>,
        views: usize,
        hook: &mut dyn EncoderHook,
    ) -> Result<VisionRun> {
        let axis = self.family.views_axis();
        let mut runs = Vec::with_capacity(views);
        for v in 0..views {
            let one: Vec<(&str, Tensor)> = given
                .iter()
                .map(|(n, t)| {
                    let per_view = t.shape().len() > axis && t.shape()[axis] == views;
                    (*n, if per_view { t.select(axis, &[v]) } else { t.clone() })
                })
                .collect();
            runs.push(vision.run(one, hook)?);
        }
        let mut stages: Vec<(String, Duration)> = Vec::new();
        for run in &runs {
            add_stage_times(&mut stages, &run.stages);
        }
        let declared = vision.outputs();
        let mut joined = Vec::with_capacity(declared.len());
        for info in declared {
            let parts: Vec<Tensor> = runs
                .iter_mut()
                .map(|r| r.outputs.take(&info.name))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::interface("vision_encoder", format!("output `{}` missing", info.name)))?;
            joined.push(join_views(parts, &info.name)?);
        }
        Ok(VisionRun { outputs: NamedOutputs::new(declared, joined), stages })
    }

    /// Reshapes the extra encoder outputs named in the manifest into per-row signals, each by its
    /// registered layout.
    fn read_signals(&self, outputs: &mut NamedOutputs, input: &VisionInput) -> Result<Signals> {
        let total = input.total_tokens();
        let per = input.views.first().map_or(0, |v| v.tokens);
        let mut out = Signals::default();
        for (signal, output) in &self.signal_outputs {
            let spec = signals::spec(signal).ok_or_else(|| {
                Error::interface("vision_encoder", format!("the manifest names unknown signal `{signal}`"))
            })?;
            let t = outputs
                .take(output)
                .ok_or_else(|| {
                    Error::interface(
                        "vision_encoder",
                        format!("glimpse.json names output `{output}`, which the model lacks"),
                    )
                })?
                .into_f32(output)?;
            out.insert(spec.name, spec.layout.rows(t, input.views.len(), per, total)?);
        }
        Ok(out)
    }

    /// The encoder for a run: the staged one when a hook reduces tokens, else the loaded one.
    fn encoder_for(&self, reduced: bool) -> &VisionEncoder {
        match (&self.staged, reduced) {
            (Some(staged), true) => staged,
            _ => &self.vision,
        }
    }

    /// The merging hook (ToMe or Token Transforming) of `red`, when merging is on.
    fn merger(&self, red: &EncoderReduction) -> Option<Box<dyn Merger>> {
        let protected = self.family.encoder_prefix_tokens();
        red.merge.map(|r| red.merge_method.hook(MergeConfig { r, protected }))
    }

    /// Encodes `input` with every encoder-side reduction the pipeline is configured for: tile or
    /// region skipping (on tiled families guided by the global view and `text`, the prompt's
    /// embeddings, which `text` computes on first use) and token merging. Rows never encoded are
    /// left out of [`Encoded::present`].
    pub fn encode_reduced(
        &self,
        input: &VisionInput,
        text: &mut dyn FnMut() -> Result<Array2<f32>>,
    ) -> Result<Encoded> {
        self.encode_reduced_with(input, text, &self.reduction())
    }

    /// [`Self::encode_reduced`] with a given reduction (a request's own, checked with
    /// [`Pipeline::check_reduction`]).
    pub fn encode_reduced_with(
        &self,
        input: &VisionInput,
        text: &mut dyn FnMut() -> Result<Array2<f32>>,
        red: &EncoderReduction,
    ) -> Result<Encoded> {
        let g = input.views.iter().position(|v| v.kind == ViewKind::Global);
        let tiled = g.is_some() && !tiles::tile_views(&input.views).is_empty();
        let relevance = red.relevance();
        let text = if tiled && relevance != 0.0 { Some(text()?) } else { None };
        match (tiled, red.tiles, red.regions) {
            (true, Some(_), _) | (true, _, Some(_)) => self.encode_guided(input, g.unwrap_or(0), text.as_ref(), red),
            (false, _, Some(skip)) => self.encode_salient(input, &skip, red),
            _ => self.encode_merged(input, None, red),
        }
    }

    /// The whole input through the encoder, merged when merging is on (`only`: just these views).
    fn encode_merged(&self, input: &VisionInput, only: Option<&[usize]>, red: &EncoderReduction) -> Result<Encoded> {
        let sub;
        let input = match only {
            Some(views) => {
                sub = input.subset(views);
                &sub
            }
            None => input,
        };
        match self.merger(red) {
            Some(mut tome) => {
                let mut enc = self.encode_on(self.encoder_for(true), input, &mut *tome)?;
                let prefix = self.family.encoder_prefix_tokens();
                enc.merged = tome.take_groups().iter().map(|s| merge_groups(s, None, prefix, s.len())).collect();
                Ok(enc)
            }
            None => self.encode(input),
        }
    }

    /// Single-view region skipping: each view keeps its most salient patch groups (saliency of
    /// its own patch embeddings), run one view at a time.
    fn encode_salient(&self, input: &VisionInput, skip: &RegionSkip, red: &EncoderReduction) -> Result<Encoded> {
        let prefix = self.family.encoder_prefix_tokens();
        let mut parts = Vec::with_capacity(input.views.len());
        let mut present = Vec::with_capacity(input.views.len());
        for (v, view) in input.views.iter().enumerate() {
            let mut keep = PatchKeep::new(Keep::Salient(skip.budget), prefix, view.grid);
            let enc = self.encode_partial(input, v, &mut keep, red)?;
            present.push(keep.kept().to_vec());
            parts.push(enc);
        }
        let starts = view_starts(&input.views);
        let picks: Vec<(&Encoded, Vec<(usize, usize)>)> = parts
            .iter()
            .zip(&present)
            .zip(starts)
            .map(|((e, kept), at)| (e, kept.iter().map(|&t| (at + t, t)).collect()))
            .collect();
        let mut out = assemble(input, &picks)?;
        out.encoded = Some(present.iter().map(|p| !p.is_empty()).collect());
        out.present = Some(present);
        out.merged = parts.iter().map(|e| e.merged.first().cloned().unwrap_or_default()).collect();
        Ok(out)
    }

    /// One view through the staged encoder with region skipping (`keep`) and merging.
    fn encode_partial(
        &self,
        input: &VisionInput,
        view: usize,
        keep: &mut PatchKeep,
        red: &EncoderReduction,
    ) -> Result<Encoded> {
        let one = input.subset(&[view]);
        let (hidden, took) = self.embed_one(&one)?;
        let mut enc = self.run_partial(&one, hidden, keep, red)?;
        enc.stages.insert(0, ("vision_embed".into(), took));
        Ok(enc)
    }

    /// The staged encoder's embed stage on one view's input (`[1, tokens, d]`) and its time.
    fn embed_one(&self, one: &VisionInput) -> Result<(ndarray::Array3<f32>, Duration)> {
        let staged = self.encoder_for(true);
        staged.embed(one.inputs_for(staged.inputs(), self.family.name())?)
    }

    /// The groups and head of the staged encoder on embedded views `[views, tokens, d]` (one, or
    /// a batch of tiles keeping as many tokens each), with region skipping (`keep`) and merging;
    /// `one` is those views' input.
    fn run_partial(
        &self,
        one: &VisionInput,
        hidden: ndarray::Array3<f32>,
        keep: &mut PatchKeep,
        red: &EncoderReduction,
    ) -> Result<Encoded> {
        let staged = self.encoder_for(true);
        let tokens = hidden.shape()[1];
        let mut merger = self.merger(red);
        let run = {
            let mut hooks: Vec<&mut dyn EncoderHook> = vec![&mut *keep];
            if let Some(m) = merger.as_mut() {
                hooks.push(&mut **m);
            }
            staged.run_groups(hidden, &mut Chain(hooks))?
        };
        let mut enc = self.finish(staged, one, run)?;
        if let Some(m) = merger.as_mut() {
            let prefix = self.family.encoder_prefix_tokens();
            enc.merged = m
                .take_groups()
                .iter()
                .enumerate()
                .map(|(v, s)| merge_groups(s, Some(keep.entered_of(v)), prefix, tokens))
                .collect();
        }
        Ok(enc)
    }

    /// Tile and region skipping on a tiled image: encodes the global view and scores every
    /// tile token from the global token over it ([`tiles::global_token_scores`]); tile skipping
    /// then encodes the best whole tiles, region skipping embeds every tile (one batched embed
    /// run), adds each token's patch-embedding saliency to its score and runs the layers on the
    /// chosen patch groups only. Rows never encoded are absent, or stand in from the global view
    /// under `--skipped-tiles global`; every view keeps its place in the prompt.
    fn encode_guided(
        &self,
        input: &VisionInput,
        g: usize,
        text: Option<&Array2<f32>>,
        red: &EncoderReduction,
    ) -> Result<Encoded> {
        // under region skipping the tiles' rows come from the stages, which carry no signals, so
        // the global view runs the stages too (cheaper than the monolithic file's signal outputs)
        // region skipping may also keep only the global view's most salient patch groups
        let mut global_rows: Option<Vec<usize>> = None;
        let global = match (red.regions, self.merger(red)) {
            (Some(skip), _) if !skip.global.is_full() => {
                let prefix = self.family.encoder_prefix_tokens();
                let mut keep = PatchKeep::new(Keep::Salient(skip.global), prefix, input.views[g].grid);
                let e = self.encode_partial(input, g, &mut keep, red)?;
                global_rows = Some(keep.kept().to_vec());
                e
            }
            (Some(_), None) => self.encode_on(self.encoder_for(true), &input.subset(&[g]), &mut NoReduction)?,
            _ => self.encode_merged(input, Some(&[g]), red)?,
        };
        let gview = &input.views[g];
        let relevance = red.relevance();
        let gscores = match &global_rows {
            None => tiles::global_token_scores(&global.features, text, relevance),
            Some(rows) => {
                // scored among the global tokens encoded; the others score lowest
                let s = tiles::global_token_scores(&global.features.select(Axis(0), rows), text, relevance);
                let low = s.iter().copied().fold(f32::INFINITY, f32::min);
                let mut all = vec![if low.is_finite() { low } else { 0.0 }; gview.tokens];
                for (&r, v) in rows.iter().zip(s) {
                    all[r] = v;
                }
                all
            }
        };
        let tile_ids = tiles::tile_views(&input.views);
        let mut runs: Vec<(Vec<usize>, Encoded)> = Vec::new(); // (views, encoding of them in order)
        let mut extra_stages: Vec<(String, Duration)> = Vec::new();
        let (kept, skipped): (Vec<Vec<usize>>, SkippedTiles) = match (red.tiles, red.regions) {
            (_, Some(skip)) => {
                // one tile at a time, like every other encoder run: the embed stage then sees one
                // shape, which tract plans for exactly (a batch would be as many as the image has)
                let mut embedded = Vec::with_capacity(tile_ids.len());
                let mut took = Duration::ZERO;
                for &v in &tile_ids {
                    let (h, t) = self.embed_one(&input.subset(&[v]))?;
                    embedded.push(h);
                    took += t;
                }
                extra_stages.push(("vision_embed".into(), took));
                let prefix = self.family.encoder_prefix_tokens();
                // prior (global view) and local (patch embeddings) scores, each z-scored over all tiles
                let mut prior = Vec::new();
                let mut local = Vec::new();
                for (hidden, &v) in embedded.iter().zip(&tile_ids) {
                    let layout = PatchLayout::new(hidden.shape()[1], prefix, input.views[v].grid)?;
                    prior.extend(regions::prior_of(&input.views[v], gview, &gscores));
                    local.extend(regions::embedding_saliency(&hidden.index_axis(Axis(0), 0).to_owned(), &layout));
                }
                let combined: Vec<f32> =
                    tiles::zscore(&prior).into_iter().zip(tiles::zscore(&local)).map(|(a, b)| a + b).collect();
                let mut scores = vec![Vec::new(); input.views.len()];
                let mut at = 0;
                for &v in &tile_ids {
                    scores[v] = combined[at..at + input.views[v].tokens].to_vec();
                    at += input.views[v].tokens;
                }
                let kept = regions::choose_regions(&input.views, &scores, skip.budget, skip.scope);
                let chosen: Vec<(usize, ndarray::Array3<f32>)> =
                    tile_ids.iter().copied().zip(embedded).filter(|(v, _)| !kept[*v].is_empty()).collect();
                let same = chosen.windows(2).all(|w| kept[w[0].0].len() == kept[w[1].0].len());
                if self.batch_tiles && same && chosen.len() > 1 {
                    // one batch through the groups and head: as many tokens each
                    let views: Vec<usize> = chosen.iter().map(|(v, _)| *v).collect();
                    let parts: Vec<_> = chosen.iter().map(|(_, h)| h.view()).collect();
                    let hidden = ndarray::concatenate(Axis(0), &parts)
                        .map_err(|e| Error::interface("region skipping", format!("batching the tiles: {e}")))?;
                    let keeps = views.iter().map(|&v| Keep::Tokens(kept[v].clone())).collect();
                    let mut keep = PatchKeep::batch(keeps, prefix, input.views[views[0]].grid);
                    let enc = self.run_partial(&input.subset(&views), hidden, &mut keep, red)?;
                    runs.push((views, enc));
                } else {
                    for (v, one) in chosen {
                        let mut keep = PatchKeep::new(Keep::Tokens(kept[v].clone()), prefix, input.views[v].grid);
                        runs.push((vec![v], self.run_partial(&input.subset(&[v]), one, &mut keep, red)?));
                    }
                }
                (kept, skip.skipped)
            }
            (Some(skip), None) => {
                let chosen = tiles::choose_tiles(&input.views, g, &gscores, skip.budget);
                if !chosen.is_empty() {
                    runs.push((chosen.clone(), self.encode_merged(input, Some(&chosen), red)?));
                }
                let kept = input
                    .views
                    .iter()
                    .enumerate()
                    .map(|(i, v)| if i == g || chosen.contains(&i) { (0..v.tokens).collect() } else { Vec::new() })
                    .collect();
                (kept, skip.skipped)
            }
            (None, None) => return self.encode_merged(input, None, red),
        };
        let starts = view_starts(&input.views);
        // each present row: (encoding, row in it)
        let mut picks: Vec<(&Encoded, Vec<(usize, usize)>)> = vec![(&global, Vec::new())];
        for (_, e) in &runs {
            picks.push((e, Vec::new()));
        }
        let mut present = vec![Vec::new(); input.views.len()];
        for (v, view) in input.views.iter().enumerate() {
            let at = starts[v];
            if v == g {
                let rows = global_rows.clone().unwrap_or_else(|| (0..view.tokens).collect());
                picks[0].1.extend(rows.iter().map(|&t| (at + t, t)));
                present[v] = rows;
                continue;
            }
            let mut here: Vec<usize> = kept[v].clone();
            if let Some((r, (views, _))) = runs.iter().enumerate().find(|(_, (vs, _))| vs.contains(&v)) {
                // rows of view v within that run: views before it in the run come first
                let before: usize = views.iter().take_while(|&&w| w != v).map(|&w| input.views[w].tokens).sum();
                picks[r + 1].1.extend(kept[v].iter().map(|&t| (at + t, before + t)));
            }
            if skipped == SkippedTiles::Global && kept[v].len() < view.tokens {
                // one stand-in per global token over the dropped part, at the first dropped tile
                // token under it
                let mut used = std::collections::BTreeSet::new();
                for t in 0..view.tokens {
                    let gt = regions::global_token_over(view, gview, t);
                    if kept[v].binary_search(&t).is_err() && used.insert(gt) {
                        picks[0].1.push((at + t, gt));
                        here.push(t);
                    }
                }
            }
            here.sort_unstable();
            present[v] = here;
        }
        let mut out = assemble(input, &picks)?;
        out.encoded =
            Some((0..input.views.len()).map(|v| v == g || runs.iter().any(|(views, _)| views.contains(&v))).collect());
        out.merged = vec![Vec::new(); input.views.len()];
        out.merged[g] = global.merged.first().cloned().unwrap_or_default();
        for (views, e) in &runs {
            for (k, &v) in views.iter().enumerate() {
                out.merged[v] = e.merged.get(k).cloned().unwrap_or_default();
            }
        }
        let mut stages = global.stages.clone();
        add_stage_times(&mut stages, &extra_stages);
        for (_, e) in &runs {
            add_stage_times(&mut stages, &e.stages);
        }
        out.stages = stages;
        out.present = Some(present);
        Ok(out)
    }
}

/// Builds the full-layout encoding of `input` from rows of several encodings: `(encoding,
/// [(row in the full layout, row in that encoding)])`. Rows not given are zero (and absent);
/// a signal is kept only when every encoding that gives rows has it.
pub(super) fn assemble(input: &VisionInput, picks: &[(&Encoded, Vec<(usize, usize)>)]) -> Result<Encoded> {
    let n = input.total_tokens();
    let used: Vec<&(&Encoded, Vec<(usize, usize)>)> = picks.iter().filter(|(_, r)| !r.is_empty()).collect();
    let d = used.first().map_or(0, |(e, _)| e.features.ncols());
    let mut features = Array2::<f32>::zeros((n, d));
    let check = |dst: usize, src: usize, e: &Encoded| {
        if dst >= n || src >= e.features.nrows() || e.features.ncols() != d {
            Err(Error::interface("encoder reduction", format!("row {src} -> {dst} outside the layout of {n}")))
        } else {
            Ok(())
        }
    };
    for (e, rows) in &used {
        for &(dst, src) in rows {
            check(dst, src, e)?;
            features.row_mut(dst).assign(&e.features.row(src));
        }
    }
    let mut signals = Signals::default();
    if let Some((first, _)) = used.first() {
        for (name, a) in first.signals.iter() {
            if !used.iter().all(|(e, _)| e.signals.get(name).is_some_and(|b| b.ncols() == a.ncols())) {
                continue;
            }
            let mut full = Array2::<f32>::zeros((n, a.ncols()));
            for (e, rows) in &used {
                let b = e.signals.get(name).ok_or_else(|| Error::interface("encoder reduction", "signal"))?;
                for &(dst, src) in rows {
                    if src < b.nrows() {
                        full.row_mut(dst).assign(&b.row(src));
                    }
                }
            }
            signals.insert(name, full);
        }
    }
    Ok(Encoded { features, signals, stages: Vec::new(), present: None, encoded: None, merged: Vec::new() })
}
