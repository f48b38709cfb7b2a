//! Pruning signals: extra per-token outputs of the vision encoder that selection methods read
//! (attention, keys), registered in [`SIGNALS`] with the rule that turns the exported tensor into
//! one row per visual token. A new signal is one [`SignalSpec`] line here plus the export that
//! writes it (`tools/export`, named in the manifest's `signals` map); methods read it by name
//! through [`super::Rows::signal`].

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD, Axis};

use crate::error::{Error, Result};

/// How an exported signal tensor maps onto the visual tokens (views concatenated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[views, width, tokens]`: per view, one row of `tokens` values per exported layer;
    /// transposed to `[views × tokens, width]`.
    ViewsWidthTokens,
    /// Tokens in order, any leading axes of size 1: `[..., N, width]` or `[..., N]`
    /// (a vector becomes width 1).
    Rows,
}

/// A registered signal: its name in the manifest's `signals` map, and its layout.
#[derive(Debug, Clone, Copy)]
pub struct SignalSpec {
    /// Key in `glimpse.json`'s `signals` map and the name methods ask for.
    pub name: &'static str,
    pub layout: Layout,
    /// What it is, for docs and errors.
    pub summary: &'static str,
}

/// Every signal Glimpse understands, in the order `glimpse inspect` lists them.
pub const SIGNALS: &[SignalSpec] = &[
    SignalSpec {
        name: "cls_attention",
        layout: Layout::ViewsWidthTokens,
        summary: "head-averaged CLS→patch attention of the last layers before the final one (CLIP towers)",
    },
    SignalSpec {
        name: "attention_received",
        layout: Layout::Rows,
        summary: "attention each token receives, heads and queries averaged",
    },
    SignalSpec { name: "keys", layout: Layout::Rows, summary: "head-averaged keys of the feature layer" },
];

/// The registered signal called `name`.
pub fn spec(name: &str) -> Option<&'static SignalSpec> {
    SIGNALS.iter().find(|s| s.name == name)
}

impl Layout {
    /// Reshapes an exported tensor into `[total, width]` for `views` views of `per_view` tokens.
    pub fn rows(self, t: ArrayD<f32>, views: usize, per_view: usize, total: usize) -> Result<Array2<f32>> {
        let shape = t.shape().to_vec();
        let bad = |why: String| Error::interface("vision_encoder", format!("signal of shape {shape:?}: {why}"));
        let width = t.len().checked_div(total).unwrap_or(0);
        if total == 0 || width == 0 || width * total != t.len() {
            return Err(bad(format!("{} values do not split into {total} token rows", t.len())));
        }
        match self {
            Layout::ViewsWidthTokens => {
                if views * per_view != total {
                    return Err(bad(format!("views of unequal size ({views} × {per_view} ≠ {total})")));
                }
                let a = t.into_shape_with_order((views, width, per_view)).map_err(|e| bad(e.to_string()))?;
                let a = a.permuted_axes([0, 2, 1]).as_standard_layout().to_owned();
                a.into_shape_with_order((total, width)).map_err(|e| bad(e.to_string()))
            }
            Layout::Rows => t.into_shape_with_order((total, width)).map_err(|e| bad(e.to_string())),
        }
    }
}

/// Optional per-token signals a method may use, aligned row for row with the features (views
/// concatenated, like the features), plus the prompt's text embeddings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    rows: BTreeMap<String, Array2<f32>>,
    /// The language model's own embeddings of the instruction tokens, `[m, d]` (not per token;
    /// computed by the pipeline only for methods that need it).
    pub text: Option<Array2<f32>>,
}

impl Signals {
    /// A per-token signal `[N, width]`, if present.
    pub fn get(&self, name: &str) -> Option<&Array2<f32>> {
        self.rows.get(name)
    }

    /// Sets a per-token signal.
    pub fn insert(&mut self, name: &str, rows: Array2<f32>) {
        self.rows.insert(name.to_string(), rows);
    }

    /// The per-token signals present, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Array2<f32>)> {
        self.rows.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The rows `rows` of every per-token signal (text is kept as is).
    pub fn select_rows(&self, rows: &[usize]) -> Signals {
        Signals {
            rows: self.rows.iter().map(|(k, v)| (k.clone(), v.select(Axis(0), rows))).collect(),
            text: self.text.clone(),
        }
    }

    /// Concatenates the signals of consecutive row groups; a signal missing in any group is
    /// dropped (it would not line up with the features).
    pub fn concat(parts: &[Signals]) -> Signals {
        let mut out = Signals::default();
        let Some(first) = parts.first() else { return out };
        for name in first.rows.keys() {
            let views: Option<Vec<_>> = parts.iter().map(|p| p.rows.get(name).map(|a| a.view())).collect();
            if let Some(cat) = views.and_then(|v| ndarray::concatenate(Axis(0), &v).ok()) {
                out.rows.insert(name.clone(), cat);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn layouts_put_one_row_per_token() {
        // two views of three tokens, two layers: [views, layers, tokens]
        let t = ArrayD::from_shape_vec(IxDyn(&[2, 2, 3]), (0..12).map(|x| x as f32).collect()).unwrap();
        let r = Layout::ViewsWidthTokens.rows(t, 2, 3, 6).unwrap();
        assert_eq!(r.shape(), &[6, 2]);
        assert_eq!(r.row(1).to_vec(), vec![1.0, 4.0]);
        assert_eq!(r.row(3).to_vec(), vec![6.0, 9.0]);
        let v = ArrayD::from_shape_vec(IxDyn(&[1, 6]), (0..6).map(|x| x as f32).collect()).unwrap();
        assert_eq!(Layout::Rows.rows(v, 2, 3, 6).unwrap().shape(), &[6, 1]);
        let odd = ArrayD::from_shape_vec(IxDyn(&[7]), vec![0.0; 7]).unwrap();
        assert!(Layout::Rows.rows(odd, 2, 3, 6).is_err());
    }

    #[test]
    fn select_and_concat_keep_rows_aligned() {
        let mut s = Signals::default();
        s.insert("keys", Array2::from_shape_fn((4, 2), |(i, j)| (i * 2 + j) as f32));
        let a = s.select_rows(&[0, 2]);
        let b = s.select_rows(&[3]);
        let c = Signals::concat(&[a, b]);
        assert_eq!(c.get("keys").unwrap().column(0).to_vec(), vec![0.0, 4.0, 6.0]);
        let mut d = Signals::default();
        d.insert("other", Array2::zeros((1, 1)));
        assert!(Signals::concat(&[s.clone(), d]).get("keys").is_none(), "missing in one group: dropped");
        assert!(SIGNALS.iter().all(|x| spec(x.name).is_some()));
    }
}
