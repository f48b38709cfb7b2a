//! The vision encoder as the pipeline runs it: one monolithic session, or the staged form the
//! manifest lists (`docs/stages.md`) — `vision_embed` (pixels → the residual stream entering
//! layer 0), groups of encoder layers whose token axis is dynamic, and `vision_head` (the full
//! grid → the monolithic outputs) — with an [`EncoderHook`] between the groups where token
//! reduction inside the encoder happens. With [`NoReduction`] the staged encoder's outputs equal
//! the monolithic encoder's.

use std::time::{Duration, Instant};

use ndarray::{Array2, Array3, ArrayD, Ix3};
use serde::Serialize;

use crate::backend::{ElemType, NamedOutputs, Placement, Session, Tensor, TensorInfo};
use crate::error::{Error, Result};
use crate::split::{BIAS, HIDDEN_IN as HIDDEN, HIDDEN_OUT, KEYS};

/// Which form of the vision encoder a pipeline loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderForm {
    /// The stages when the manifest lists them and their files exist for the dtype (and they
    /// carry the signals the manifest names); the monolithic file otherwise.
    #[default]
    Auto,
    /// `vision_encoder*.onnx`, one session.
    Monolithic,
    /// The stages; an error when the folder has none (`glimpse split` makes them).
    Staged,
}

impl std::str::FromStr for EncoderForm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(EncoderForm::Auto),
            "monolithic" => Ok(EncoderForm::Monolithic),
            "staged" => Ok(EncoderForm::Staged),
            _ => Err(Error::invalid("encoder form", s, "expected auto, monolithic or staged")),
        }
    }
}

/// The stream between two groups of encoder layers.
#[derive(Debug, Clone)]
pub struct Between {
    /// Residual stream `[views, tokens, d]`.
    pub hidden: Array3<f32>,
    /// Additive bias on the attention logit of each key `[views, tokens]` the next group reads
    /// (0: plain attention; `ln(size)` of merged tokens: proportional attention).
    pub bias: Array2<f32>,
    /// The last group's keys averaged over heads `[views, tokens, head_dim]`, when it outputs them.
    pub keys: Option<Array3<f32>>,
    /// Tokens per view entering the first group (the full grid the head needs).
    pub grid: usize,
}

/// Reduces (and restores) tokens between the groups of a staged encoder.
pub trait EncoderHook {
    /// After the embed stage, before the first group: may drop tokens (region skipping); the
    /// state then holds the embedded full grid, `state.grid` tokens per view.
    fn before_groups(&mut self, _state: &mut Between) -> Result<()> {
        Ok(())
    }
    /// After group `index` (encoder layers `layers`) ran, before the next group: may change the
    /// tokens, the bias or both (a group runs on any number of tokens).
    fn after_group(&mut self, _index: usize, _layers: [usize; 2], _state: &mut Between) -> Result<()> {
        Ok(())
    }
    /// Before the head: must leave `state.grid` tokens per view (the head's connector needs the
    /// full grid, e.g. Idefics3's pixel shuffle), restoring reduced ones.
    fn before_head(&mut self, _state: &mut Between) -> Result<()> {
        Ok(())
    }
}

/// The hook that changes nothing: the staged encoder then computes what the monolithic one does.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReduction;

impl EncoderHook for NoReduction {}

/// One loaded group of encoder layers.
pub struct Group {
    pub session: Box<dyn Session>,
    /// Encoder layers `[first, end)` it runs.
    pub layers: [usize; 2],
}

/// The loaded vision encoder.
pub enum VisionEncoder {
    Monolithic(Box<dyn Session>),
    Staged { embed: Box<dyn Session>, groups: Vec<Group>, head: Box<dyn Session> },
}

/// Hooks run in order: `before_groups` and `after_group` first to last, `before_head` last to
/// first (what the last hook reduced is restored first), e.g. region skipping then merging.
pub struct Chain<'a>(pub Vec<&'a mut dyn EncoderHook>);

impl EncoderHook for Chain<'_> {
    fn before_groups(&mut self, state: &mut Between) -> Result<()> {
        self.0.iter_mut().try_for_each(|h| h.before_groups(state))
    }
    fn after_group(&mut self, index: usize, layers: [usize; 2], state: &mut Between) -> Result<()> {
        self.0.iter_mut().try_for_each(|h| h.after_group(index, layers, state))
    }
    fn before_head(&mut self, state: &mut Between) -> Result<()> {
        self.0.iter_mut().rev().try_for_each(|h| h.before_head(state))
    }
}

/// The stage key under which the hook's own time (scoring, matching, merging) is reported.
pub const REDUCTION_STAGE: &str = "encoder_reduction";

/// The encoder's outputs (the monolithic ones, or the head's) and the time of each stage run.
pub struct VisionRun {
    pub outputs: NamedOutputs,
    /// `(stage stem, wall time)` in run order; one entry for a monolithic encoder. The hook's
    /// time is [`REDUCTION_STAGE`], listed before the head.
    pub stages: Vec<(String, Duration)>,
}

/// A group's residual-stream output: `hidden_states_out`, else its first output other than `keys`.
fn stream_out(s: &dyn Session) -> Option<&str> {
    let outs = s.outputs();
    outs.iter().find(|o| o.name == HIDDEN_OUT).or_else(|| outs.iter().find(|o| o.name != KEYS)).map(|o| o.name.as_str())
}

impl VisionEncoder {
    /// Whether the stages run.
    pub fn is_staged(&self) -> bool {
        matches!(self, VisionEncoder::Staged { .. })
    }

    /// Declared inputs (the embed stage's for a staged encoder: the same as the monolithic's).
    pub fn inputs(&self) -> &[TensorInfo] {
        match self {
            VisionEncoder::Monolithic(s) => s.inputs(),
            VisionEncoder::Staged { embed, .. } => embed.inputs(),
        }
    }

    /// Declared outputs (the head's for a staged encoder).
    pub fn outputs(&self) -> &[TensorInfo] {
        match self {
            VisionEncoder::Monolithic(s) => s.outputs(),
            VisionEncoder::Staged { head, .. } => head.outputs(),
        }
    }

    /// Where it runs (every stage runs on the same backend; the head's placement stands for all).
    pub fn placement(&self) -> Placement {
        match self {
            VisionEncoder::Monolithic(s) => s.placement(),
            VisionEncoder::Staged { head, .. } => head.placement(),
        }
    }

    /// Per session (the monolithic one, or embed, groups, head), the input shapes its backend
    /// planned it for exactly ([`Session::fixed_plans`]).
    pub fn fixed_plans(&self) -> Vec<Vec<String>> {
        match self {
            VisionEncoder::Monolithic(s) => vec![s.fixed_plans()],
            VisionEncoder::Staged { embed, groups, head } => std::iter::once(embed.fixed_plans())
                .chain(groups.iter().map(|g| g.session.fixed_plans()))
                .chain(std::iter::once(head.fixed_plans()))
                .collect(),
        }
    }

    /// Checks that the stages have the interface `docs/stages.md` gives, naming the stem.
    pub fn check(&self, stems: &[&str]) -> Result<()> {
        let VisionEncoder::Staged { embed, groups, head } = self else { return Ok(()) };
        let has = |io: &[TensorInfo], name: &str| io.iter().any(|i| i.name == name);
        let named = |k: usize| stems.get(k).copied().unwrap_or("vision stage").to_string();
        if !has(embed.outputs(), HIDDEN) {
            return Err(Error::interface(named(0), format!("the embed stage has no `{HIDDEN}` output")));
        }
        for (k, g) in groups.iter().enumerate() {
            let s = g.session.as_ref();
            if !has(s.inputs(), HIDDEN) || stream_out(s).is_none() {
                return Err(Error::interface(
                    named(k + 1),
                    format!("a group takes `{HIDDEN}` and returns `{HIDDEN_OUT}`"),
                ));
            }
            if let Some(other) = s.inputs().iter().find(|i| i.name != HIDDEN && i.name != BIAS) {
                return Err(Error::interface(named(k + 1), format!("unexpected group input `{}`", other.name)));
            }
        }
        if head.inputs().len() != 1 || head.inputs()[0].name != HIDDEN {
            return Err(Error::interface(named(groups.len() + 1), format!("the head takes exactly `{HIDDEN}`")));
        }
        Ok(())
    }

    /// Runs the encoder on its named inputs; a staged one calls `hook` between groups.
    pub fn run(&self, given: Vec<(&str, Tensor)>, hook: &mut dyn EncoderHook) -> Result<VisionRun> {
        match self {
            VisionEncoder::Monolithic(s) => {
                let t = Instant::now();
                let outputs = NamedOutputs::new(s.outputs(), s.run(given)?);
                Ok(VisionRun { outputs, stages: vec![("vision_encoder".into(), t.elapsed())] })
            }
            VisionEncoder::Staged { .. } => {
                let (hidden, took) = self.embed(given)?;
                let mut run = self.run_groups(hidden, hook)?;
                run.stages.insert(0, ("vision_embed".into(), took));
                Ok(run)
            }
        }
    }

    /// The embed stage alone: the residual stream entering the first group `[views, tokens, d]`
    /// and its time. An error for a monolithic encoder.
    pub fn embed(&self, given: Vec<(&str, Tensor)>) -> Result<(Array3<f32>, Duration)> {
        let VisionEncoder::Staged { embed, .. } = self else {
            return Err(Error::interface("vision_encoder", "a monolithic encoder has no embed stage"));
        };
        let t = Instant::now();
        let mut out = NamedOutputs::new(embed.outputs(), embed.run(given)?);
        let hidden = take3(&mut out, HIDDEN, "vision_embed")?;
        Ok((hidden, t.elapsed()))
    }

    /// The groups (with `hook` before, between and after them) and the head on an embedded
    /// stream `[views, tokens, d]` (what [`VisionEncoder::embed`] returns).
    pub fn run_groups(&self, hidden: Array3<f32>, hook: &mut dyn EncoderHook) -> Result<VisionRun> {
        let VisionEncoder::Staged { groups, head, .. } = self else {
            return Err(Error::interface("vision_encoder", "a monolithic encoder has no groups"));
        };
        let mut stages = Vec::with_capacity(groups.len() + 2);
        let (views, grid) = (hidden.shape()[0], hidden.shape()[1]);
        let mut state = Between { hidden, bias: Array2::zeros((views, grid)), keys: None, grid };
        let mut hook_time = Duration::ZERO;
        let t = Instant::now();
        hook.before_groups(&mut state)?;
        hook_time += t.elapsed();
        for (k, g) in groups.iter().enumerate() {
            let name = format!("vision_blocks_{k}");
            let t = Instant::now();
            let (v, n) = (state.hidden.shape()[0], state.hidden.shape()[1]);
            if state.bias.dim() != (v, n) {
                return Err(Error::interface(
                    &name,
                    format!("attention bias {:?} does not match the tokens [{v}, {n}]", state.bias.dim()),
                ));
            }
            let s = g.session.as_ref();
            let mut inputs = vec![(HIDDEN, as_declared(s, HIDDEN, state.hidden.clone().into_dyn()))];
            if s.inputs().iter().any(|i| i.name == BIAS) {
                inputs.push((BIAS, as_declared(s, BIAS, state.bias.clone().into_dyn())));
            }
            let stream = stream_out(s).unwrap_or(HIDDEN_OUT).to_string();
            let mut out = NamedOutputs::new(s.outputs(), s.run(inputs)?);
            state.hidden = take3(&mut out, &stream, &name)?;
            state.keys = out.take(KEYS).map(|t| to3(t, KEYS, &name)).transpose()?;
            stages.push((name, t.elapsed()));
            if k + 1 < groups.len() {
                let t = Instant::now();
                hook.after_group(k, g.layers, &mut state)?;
                hook_time += t.elapsed();
            }
        }
        let t = Instant::now();
        hook.before_head(&mut state)?;
        stages.push((REDUCTION_STAGE.into(), hook_time + t.elapsed()));
        if state.hidden.shape()[1] != state.grid {
            return Err(Error::interface(
                "vision_head",
                format!(
                    "the encoder reduction left {} tokens per view; the head needs the full grid of {}",
                    state.hidden.shape()[1],
                    state.grid
                ),
            ));
        }
        let t = Instant::now();
        let given = vec![(HIDDEN, as_declared(head.as_ref(), HIDDEN, state.hidden.into_dyn()))];
        let outputs = NamedOutputs::new(head.outputs(), head.run(given)?);
        stages.push(("vision_head".into(), t.elapsed()));
        Ok(VisionRun { outputs, stages })
    }
}

/// An f32 array as the element type `session` declares for input `name` (fp16 variants take f16).
pub(crate) fn as_declared(session: &dyn Session, name: &str, a: ArrayD<f32>) -> Tensor {
    match session.inputs().iter().find(|i| i.name == name).map(|i| i.elem) {
        Some(ElemType::F16) => Tensor::F16(a.mapv(half::f16::from_f32)),
        _ => Tensor::F32(a),
    }
}

/// Adds each stage time to the entry of the same name (stages run once per view, or twice with
/// tile skipping), keeping first-run order.
pub(crate) fn add_stage_times(into: &mut Vec<(String, Duration)>, more: &[(String, Duration)]) {
    for (name, took) in more {
        match into.iter_mut().find(|(n, _)| n == name) {
            Some((_, t)) => *t += *took,
            None => into.push((name.clone(), *took)),
        }
    }
}

fn to3(t: Tensor, what: &str, stage: &str) -> Result<Array3<f32>> {
    let a = t.into_f32(&format!("{stage} {what}"))?;
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix3>()
        .map_err(|_| Error::interface(stage, format!("`{what}` has shape {shape:?}; expected [views, tokens, d]")))
}

fn take3(out: &mut NamedOutputs, name: &str, stage: &str) -> Result<Array3<f32>> {
    let t = out.take(name).ok_or_else(|| Error::interface(stage, format!("no `{name}` output")))?;
    to3(t, name, stage)
}
