//! Token selection: the stage between encode and splice that decides which visual feature rows
//! reach the language model. One file per method, registered in [`METHODS`] (one line each);
//! this module holds the method trait, the registry and the helpers methods share; the budget
//! lives in `budget`, the configured stage in `selector`, the signals in [`signals`]. The
//! methods that act before or inside the encoder — tile skipping ([`tiles`]), region skipping
//! ([`regions`]), token merging ([`tome`]) — are registered in [`ENCODER_METHODS`].

use std::collections::BTreeMap;
use std::fmt;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};

use crate::error::{Error, Result};
pub use budget::{proportional, Budget, Scope, SelectConfig};
pub use selector::{Selection, SelectionInput, Selector};
pub use signals::Signals;

mod budget;
pub mod cdpruner;
pub mod dart;
pub mod divprune;
pub mod globalcom2;
pub mod pool;
pub mod random;
pub mod recoverable;
pub mod regions;
mod selector;
pub mod signals;
pub mod tiles;
pub mod todre;
pub mod tome;
pub mod transform;
pub mod uniform;
pub mod visionzip;
pub mod vtc_cls;

/// The signals a method needs; the pipeline computes the optional ones only when asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub text: bool,
}

/// Rows of one selection call: features and the signals restricted to those rows.
#[derive(Debug, Clone)]
pub struct Rows<'a> {
    pub features: ArrayView2<'a, f32>,
    /// `(rows, cols)` patch grid when the rows are exactly one view.
    pub grid: Option<(usize, usize)>,
    /// Per-token signals by registered name ([`signals::SIGNALS`]), `[rows, width]`.
    pub signals: BTreeMap<&'static str, Array2<f32>>,
    /// Instruction embeddings (not rows to select; context only).
    pub text: Option<ArrayView2<'a, f32>>,
    pub seed: u64,
    pub lambda: f32,
}

impl Rows<'_> {
    /// A per-token signal by name, `[rows, width]`.
    pub fn signal(&self, name: &str) -> Option<&Array2<f32>> {
        self.signals.get(name)
    }

    /// CLS attention summed over the exported layers, per row.
    pub fn cls(&self) -> Option<Array1<f32>> {
        self.signal("cls_attention").map(|a| a.sum_axis(Axis(1)))
    }

    /// CLS attention of the last exported layer (layer -2), per row.
    pub fn cls_last(&self) -> Option<Array1<f32>> {
        self.signal("cls_attention").map(|a| a.column(a.ncols().saturating_sub(1)).to_owned())
    }

    /// Attention received, per row.
    pub fn received(&self) -> Option<Array1<f32>> {
        self.signal("attention_received").map(|a| a.column(0).to_owned())
    }

    /// Encoder keys, per row.
    pub fn keys(&self) -> Option<&Array2<f32>> {
        self.signal("keys")
    }
}

/// What a method chose among `Rows`: ascending indices, and new values for rows it merged into.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chosen {
    pub indices: Vec<usize>,
    pub replaced: Vec<(usize, Array1<f32>)>,
}

impl Chosen {
    /// Plain selection of `indices` (sorted here).
    pub fn keep(mut indices: Vec<usize>) -> Self {
        indices.sort_unstable();
        Chosen { indices, replaced: Vec::new() }
    }
}

/// A token-selection method working on a set of rows.
pub trait Method: Send + Sync {
    /// Name as typed on the command line.
    fn name(&self) -> &'static str;
    /// Optional signals it needs computed.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Whether it needs a patch grid, so it always works view by view.
    fn per_view_only(&self) -> bool {
        false
    }
    /// Chooses exactly `k` rows (`0 < k < n`).
    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen>;
    /// Methods that allocate the budget across views themselves (GlobalCom2) return a whole
    /// selection here; the default defers to [`Method::choose`] under the configured scope.
    fn select_views(&self, _input: &SelectionInput<'_>, _budget: Budget) -> Option<Result<Selection>> {
        None
    }
}

/// Where in the pipeline a method acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Acts {
    /// Before the vision encoder: decides what is encoded at all (e.g. tile skipping).
    BeforeEncoder,
    /// Between the encoder's block groups (token merging; needs a staged encoder).
    InsideEncoder,
    /// Between encoder and language model: chooses which feature rows are spliced in.
    AfterEncoder,
}

impl Acts {
    /// Where, in words (for `--help`).
    pub fn name(self) -> &'static str {
        match self {
            Acts::BeforeEncoder => "before the encoder",
            Acts::InsideEncoder => "inside the encoder",
            Acts::AfterEncoder => "after the encoder",
        }
    }
}

/// A registered selection method: what `--prune` accepts and what its help says.
#[derive(Clone, Copy)]
pub struct MethodSpec {
    /// Name as typed on the command line.
    pub name: &'static str,
    /// One line for `--help`.
    pub summary: &'static str,
    /// Signals it reads (`a | b`: either one), for help and docs.
    pub uses: &'static str,
    /// Its own knobs (`SelectConfig` fields), for help and docs.
    pub params: &'static [&'static str],
    pub acts: Acts,
    pub make: fn() -> Box<dyn Method>,
}

impl fmt::Debug for MethodSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodSpec").field("name", &self.name).field("acts", &self.acts).finish_non_exhaustive()
    }
}

impl MethodSpec {
    /// The one-line help: what it does, where it acts, what it reads, its own knobs.
    pub fn help(&self) -> String {
        let knobs = if self.params.is_empty() { String::new() } else { format!("; knobs: {}", self.params.join(", ")) };
        format!("{} ({}; reads {}{knobs})", self.summary, self.acts.name(), self.uses)
    }
}

/// Keeping every token: the default, handled by [`Selector`] itself.
pub const NONE: MethodSpec = MethodSpec {
    name: "none",
    summary: "keep every visual token",
    uses: "features only",
    params: &[],
    acts: Acts::AfterEncoder,
    // never called: `Selector` keeps everything itself for `none`
    make: || Box::new(random::Random),
};

/// The registry: one line per method, `none` first.
pub const METHODS: &[MethodSpec] = &[
    NONE,
    random::SPEC,
    uniform::SPEC,
    pool::SPEC,
    dart::SPEC,
    divprune::SPEC,
    todre::SPEC,
    cdpruner::SPEC,
    vtc_cls::SPEC,
    visionzip::SPEC,
    globalcom2::SPEC,
    recoverable::SPEC,
];

/// A registered method that acts before or inside the vision encoder. These compose with each
/// other (tile and region skipping excepted: regions already choose within and across tiles)
/// and with one [`METHODS`] entry in a request; each has its own flag.
#[derive(Debug, Clone, Copy)]
pub struct EncoderMethodSpec {
    pub name: &'static str,
    /// The flag that turns it on.
    pub flag: &'static str,
    /// One line for `--help` and docs.
    pub summary: &'static str,
    pub acts: Acts,
    /// Whether it needs the staged encoder (`docs/stages.md`).
    pub staged: bool,
}

/// The registry of encoder-side methods: one line each, in pipeline order.
pub const ENCODER_METHODS: &[EncoderMethodSpec] = &[tiles::SPEC, regions::SPEC, tome::SPEC, transform::SPEC];

/// Every method name, `none` first.
pub fn available() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The registered method called `name`.
pub fn method_spec(name: &str) -> Result<&'static MethodSpec> {
    METHODS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::invalid("pruning method", name, format!("available: {}", available().join(", "))))
}

/// The error for a missing signal.
pub fn missing(method: &str, signal: &str, hint: &str) -> Error {
    Error::MissingSignal { method: method.into(), signal: signal.into(), hint: hint.into() }
}

/// Rows scaled to unit L2 norm (zero rows stay zero).
pub fn normalized(x: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut row in out.rows_mut() {
        let n = row.dot(&row).sqrt();
        if n > 0.0 {
            row.mapv_inplace(|v| v / n);
        }
    }
    out
}

/// Indices of the `k` largest scores (ties broken by lower index), ascending.
pub fn top_k(scores: ArrayView1<'_, f32>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Index of the largest value among entries not yet taken.
pub fn argmax_free(v: &[f32], taken: &[bool]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in v.iter().enumerate() {
        if !taken[i] && best.is_none_or(|b| x > v[b]) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::family::{View, ViewKind};

    /// A view of `n` tokens on a square-ish grid.
    pub fn view(n: usize) -> View {
        let side = (n as f64).sqrt() as usize;
        let grid = if side * side == n { (side, side) } else { (1, n) };
        View { kind: ViewKind::Whole, tokens: n, grid, region: [0.0, 0.0, 1.0, 1.0] }
    }

    /// Tile (row, col) of a 2 × 2 split, with a `side × side` patch grid.
    pub fn quadrant_tile(row: usize, col: usize, side: usize) -> View {
        let (x0, y0) = (col as f32 * 0.5, row as f32 * 0.5);
        View {
            kind: ViewKind::Tile { row, col },
            tokens: side * side,
            grid: (side, side),
            region: [x0, y0, x0 + 0.5, y0 + 0.5],
        }
    }

    /// Deterministic pseudo-random features.
    pub fn features(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        Array2::from_shape_fn((n, d), |_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
    }

    /// Rows over all of `f` with no signals.
    pub fn rows(f: &Array2<f32>) -> Rows<'_> {
        Rows { features: f.view(), grid: None, signals: BTreeMap::new(), text: None, seed: 7, lambda: 0.5 }
    }
}
