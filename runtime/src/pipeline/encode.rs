//! The encode stage: the vision part on the preprocessed views, the family's post-encoder
//! packing, the registered pruning signals; and tile skipping, which encodes the global view
//! first and then only the tiles [`crate::select::tiles`] chooses.

use std::time::Duration;

use ndarray::{Array2, Axis};

use super::vision::{add_stage_times, EncoderHook, NoReduction, VisionRun};
use super::Pipeline;
use crate::backend::{NamedOutputs, Tensor};
use crate::error::{Error, Result};
use crate::family::{View, VisionInput};
use crate::select::tiles::{self, SkippedTiles, TileSkip};
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
        let given = input.inputs_for(self.vision.inputs(), self.family.name())?;
        // images in the encoder batch: the views, or LLaVA-OneVision's anyres crops
        let axis = self.family.views_axis();
        let views = given.first().map_or(0, |(_, t)| t.shape().get(axis).copied().unwrap_or(0));
        let VisionRun { mut outputs, stages } = if self.per_view && views > 1 {
            self.run_views_one_by_one(given, views, hook)?
        } else {
            self.vision.run(given, hook)?
        };
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
        let signals = self.read_signals(&mut outputs, input)?;
        Ok(Encoded { features, signals, stages })
    }

    /// Runs the encoder once per image of its batch (inputs sliced on the family's views axis) and joins the
    /// outputs on their first axis; outputs without one per view (OneVision's `image_newline`)
    /// come from the first run.
    fn run_views_one_by_one(
        &self,
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
            runs.push(self.vision.run(one, hook)?);
        }
        let mut stages: Vec<(String, Duration)> = Vec::new();
        for run in &runs {
            add_stage_times(&mut stages, &run.stages);
        }
        let declared = self.vision.outputs();
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

    /// Tile skipping: encodes the global view, scores every tile's region from it, encodes only
    /// the chosen tiles, and returns the reduced input with its features. Skipped tiles vanish or
    /// are represented by the global tokens over their region. `text` is the prompt's embeddings.
    pub fn encode_skipping_tiles(
        &self,
        input: &VisionInput,
        text: &Array2<f32>,
        skip: TileSkip,
    ) -> Result<(VisionInput, Encoded)> {
        let g = input.views.iter().position(|v| v.kind == crate::family::ViewKind::Global);
        let (Some(g), false) = (g, tiles::tile_views(&input.views).is_empty()) else {
            return Ok((input.clone(), self.encode(input)?));
        };
        let global = self.encode(&input.subset(&[g]))?;
        let gview = &input.views[g];
        let scores = tiles::global_token_scores(&global.features, global.signals.get("attention_received"), text);
        let chosen = tiles::choose_tiles(&input.views, g, &scores, skip.budget);
        let encoded_tiles = if chosen.is_empty() { None } else { Some(self.encode(&input.subset(&chosen))?) };
        // assemble views in the original order with their feature rows
        let mut views: Vec<View> = Vec::new();
        let mut parts: Vec<(&Encoded, Vec<usize>)> = Vec::new();
        let mut tile_row = 0;
        for (i, view) in input.views.iter().enumerate() {
            if i == g {
                views.push(view.clone());
                parts.push((&global, (0..gview.tokens).collect()));
            } else if chosen.contains(&i) {
                let enc =
                    encoded_tiles.as_ref().ok_or_else(|| Error::interface("tiles", "chosen tiles not encoded"))?;
                views.push(view.clone());
                parts.push((enc, (tile_row..tile_row + view.tokens).collect()));
                tile_row += view.tokens;
            } else if skip.skipped == SkippedTiles::Global {
                let rows = tiles::covered(view, gview);
                views.push(tiles::stand_in(view, gview, rows.len()));
                parts.push((&global, rows));
            }
        }
        let features: Vec<_> = parts.iter().map(|(enc, rows)| enc.features.select(Axis(0), rows)).collect();
        let signals: Vec<_> = parts.iter().map(|(enc, rows)| enc.signals.select_rows(rows)).collect();
        let f_views: Vec<_> = features.iter().map(|f| f.view()).collect();
        let features = ndarray::concatenate(Axis(0), &f_views).map_err(|e| Error::interface("tiles", e.to_string()))?;
        let mut frames = chosen;
        frames.push(g);
        let mut reduced = input.subset(&frames);
        reduced.views = views;
        let mut stages = global.stages.clone();
        if let Some(tiles) = &encoded_tiles {
            add_stage_times(&mut stages, &tiles.stages);
        }
        Ok((reduced, Encoded { features, signals: Signals::concat(&signals), stages }))
    }
}
