//! The configured selection stage: [`Selector`] runs a registered method on one image's rows
//! under the budget and scope, and returns a [`Selection`] (kept rows per view, merged values).

use std::collections::BTreeMap;
use std::fmt;

use ndarray::{Array1, Array2, Axis};

use super::missing;
use super::{method_spec, proportional, signals, Chosen, Method, Needs, Rows, Scope, SelectConfig, Signals, NONE};
use crate::error::{Error, Result};
use crate::family::View;

/// Which rows of each view are kept (indices into the view, ascending = raster order), plus the
/// new values of rows a merging method rewrote.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    pub kept: Vec<Vec<usize>>,
    /// `(view, index in view) -> new feature row`.
    pub replaced: BTreeMap<(usize, usize), Array1<f32>>,
}

impl Selection {
    /// Keeps every row of every view.
    pub fn all(views: &[View]) -> Self {
        Selection { kept: views.iter().map(|v| (0..v.tokens).collect()).collect(), replaced: BTreeMap::new() }
    }

    /// Rows kept per view.
    pub fn counts(&self) -> Vec<usize> {
        self.kept.iter().map(Vec::len).collect()
    }

    /// Total rows kept.
    pub fn total(&self) -> usize {
        self.kept.iter().map(Vec::len).sum()
    }

    /// Gathers the kept rows of `features` (views concatenated) into a new `[k, d]` array,
    /// applying merged values.
    pub fn gather(&self, features: &Array2<f32>, views: &[View]) -> Array2<f32> {
        let mut rows = Vec::with_capacity(self.total());
        let mut offset = 0;
        for (view, kept) in views.iter().zip(&self.kept) {
            rows.extend(kept.iter().map(|&i| offset + i));
            offset += view.tokens;
        }
        let mut out = features.select(Axis(0), &rows);
        if !self.replaced.is_empty() {
            let mut r = 0;
            for (v, kept) in self.kept.iter().enumerate() {
                for &i in kept {
                    if let Some(new) = self.replaced.get(&(v, i)) {
                        out.row_mut(r).assign(new);
                    }
                    r += 1;
                }
            }
        }
        out
    }
}

/// What a selector sees: the features of one image, where they came from, and signals.
#[derive(Debug)]
pub struct SelectionInput<'a> {
    /// Feature rows `[N, d]`, views concatenated in order.
    pub features: &'a Array2<f32>,
    /// The views the rows belong to, in order (their `tokens` add up to N).
    pub views: &'a [View],
    pub signals: &'a Signals,
}

/// A configured selection stage.
pub struct Selector {
    config: SelectConfig,
    method: Option<Box<dyn Method>>,
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector").field("config", &self.config).finish()
    }
}

impl Selector {
    /// Builds the selector for a configuration, rejecting unknown methods.
    pub fn new(config: SelectConfig) -> Result<Self> {
        let spec = method_spec(&config.method)?;
        let method = if spec.name == NONE.name { None } else { Some((spec.make)()) };
        Ok(Selector { config, method })
    }

    /// The configuration.
    pub fn config(&self) -> &SelectConfig {
        &self.config
    }

    /// Signals the method needs computed by the pipeline.
    pub fn needs(&self) -> Needs {
        self.method.as_ref().map(|m| m.needs()).unwrap_or_default()
    }

    /// Chooses the rows to keep.
    pub fn select(&self, input: &SelectionInput<'_>) -> Result<Selection> {
        let n: usize = input.views.iter().map(|v| v.tokens).sum();
        if n != input.features.nrows() {
            return Err(Error::interface(
                "select",
                format!("{} feature rows for views of {n} tokens", input.features.nrows()),
            ));
        }
        let Some(method) = &self.method else { return Ok(Selection::all(input.views)) };
        if self.config.budget.is_full() {
            return Ok(Selection::all(input.views));
        }
        if let Some(sel) = method.select_views(input, self.config.budget) {
            return sel;
        }
        let per_view = self.config.scope == Scope::PerView || method.per_view_only();
        let mut sel = Selection { kept: vec![Vec::new(); input.views.len()], replaced: BTreeMap::new() };
        if per_view {
            let quotas = match (self.config.scope, self.config.budget) {
                (Scope::PerView, b) => input.views.iter().map(|v| b.of(v.tokens)).collect(),
                (Scope::Global, b) => proportional(input.views, b.of(n)),
            };
            let mut offset = 0;
            for (vi, (view, k)) in input.views.iter().zip(quotas).enumerate() {
                let range = offset..offset + view.tokens;
                offset += view.tokens;
                let rows = self.rows(input, method.as_ref(), range.clone(), Some(view.grid))?;
                let chosen = run(method.as_ref(), &rows, k)?;
                for (i, new) in chosen.replaced {
                    sel.replaced.insert((vi, i), new);
                }
                sel.kept[vi] = chosen.indices;
            }
        } else {
            let rows = self.rows(input, method.as_ref(), 0..n, None)?;
            let chosen = run(method.as_ref(), &rows, self.config.budget.of(n))?;
            let starts = crate::family::view_starts(input.views);
            let locate = |g: usize| {
                let v = starts.partition_point(|&s| s <= g) - 1;
                (v, g - starts[v])
            };
            for g in chosen.indices {
                let (v, i) = locate(g);
                sel.kept[v].push(i);
            }
            for (g, new) in chosen.replaced {
                sel.replaced.insert(locate(g), new);
            }
        }
        Ok(sel)
    }

    /// Restricts features and signals to a range of global rows.
    fn rows<'a>(
        &self,
        input: &SelectionInput<'a>,
        method: &dyn Method,
        range: std::ops::Range<usize>,
        grid: Option<(usize, usize)>,
    ) -> Result<Rows<'a>> {
        let s = input.signals;
        let n = input.features.nrows();
        if method.needs().text && s.text.is_none() {
            return Err(missing(
                method.name(),
                "text embeddings of the prompt",
                "the pipeline computes them; call select with Signals::text set",
            ));
        }
        let signals = signals::SIGNALS
            .iter()
            .filter_map(|spec| {
                let a = s.get(spec.name).filter(|a| a.nrows() == n)?;
                Some((spec.name, a.slice(ndarray::s![range.clone(), ..]).to_owned()))
            })
            .collect();
        Ok(Rows {
            features: input.features.slice(ndarray::s![range.clone(), ..]),
            grid,
            signals,
            text: s.text.as_ref().map(|t| t.view()),
            seed: self.config.seed,
            lambda: self.config.lambda,
        })
    }
}

fn run(method: &dyn Method, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
    let n = rows.features.nrows();
    if k >= n {
        return Ok(Chosen::keep((0..n).collect()));
    }
    let chosen = method.choose(rows, k)?;
    debug_assert_eq!(chosen.indices.len(), k, "{} returned {} of {k}", method.name(), chosen.indices.len());
    if chosen.indices.len() != k
        || chosen.indices.windows(2).any(|w| w[0] >= w[1])
        || chosen.indices.iter().any(|&i| i >= n)
    {
        return Err(Error::interface("select", format!("method {} broke its contract (k = {k})", method.name())));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    fn all_signals(views: &[View], d: usize) -> Signals {
        let n: usize = views.iter().map(|v| v.tokens).sum();
        let mut s = Signals::default();
        s.insert("cls_attention", Array2::from_shape_fn((n, 3), |(j, l)| ((l * 7 + j * 13) % 17) as f32));
        s.insert("attention_received", Array2::from_shape_fn((n, 1), |(j, _)| ((j * 5) % 11) as f32));
        s.insert("keys", features(n, 8, 3));
        s.text = Some(features(5, d, 4));
        s
    }

    #[test]
    fn every_method_keeps_exactly_the_budget_sorted_unique_in_range() {
        let views = vec![view(64), view(64), view(64)];
        let d = 16;
        let f = features(192, d, 1);
        let signals = all_signals(&views, d);
        for name in available() {
            for budget in [Budget::Ratio(0.5), Budget::Ratio(0.25), Budget::Ratio(0.125), Budget::Count(10)] {
                for scope in [Scope::Global, Scope::PerView] {
                    let cfg = SelectConfig { method: name.into(), budget, scope, ..Default::default() };
                    let sel = Selector::new(cfg).unwrap();
                    let out = sel.select(&SelectionInput { features: &f, views: &views, signals: &signals }).unwrap();
                    let want: usize = match (name, scope) {
                        ("none", _) => 192,
                        // GlobalCom2 moves budget between views by design: within one token per view.
                        ("globalcom2", _) => {
                            let target = budget.of(192);
                            assert!(out.total().abs_diff(target) <= views.len(), "{name} {budget}: {}", out.total());
                            out.total()
                        }
                        (_, Scope::PerView) => views.iter().map(|v| budget.of(v.tokens)).sum(),
                        (_, Scope::Global) => budget.of(192),
                    };
                    assert_eq!(out.total(), want, "{name} {budget} {scope:?}");
                    for (v, kept) in out.kept.iter().enumerate() {
                        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{name}: view {v} not sorted/unique");
                        assert!(kept.iter().all(|&i| i < views[v].tokens), "{name}: out of range");
                    }
                    let again = sel.select(&SelectionInput { features: &f, views: &views, signals: &signals }).unwrap();
                    assert_eq!(out, again, "{name}: not deterministic");
                    assert_eq!(out.gather(&f, &views).nrows(), want);
                }
            }
        }
    }

    #[test]
    fn keep_all_returns_every_row_for_every_method() {
        let views = vec![view(16), view(16)];
        let f = features(32, 8, 2);
        let signals = all_signals(&views, 8);
        for name in available() {
            for budget in [Budget::Ratio(1.0), Budget::Count(32)] {
                let cfg = SelectConfig { method: name.into(), budget, ..Default::default() };
                let out = Selector::new(cfg)
                    .unwrap()
                    .select(&SelectionInput { features: &f, views: &views, signals: &signals })
                    .unwrap();
                assert_eq!(out, Selection::all(&views), "{name} {budget}");
                assert_eq!(out.gather(&f, &views), f);
            }
        }
    }

    #[test]
    fn missing_signals_are_named() {
        let views = vec![view(16)];
        let f = features(16, 8, 2);
        for (name, signal) in
            [("vtc-cls", "CLS"), ("cdpruner", "text"), ("visionzip", "attention"), ("globalcom2", "attention")]
        {
            let cfg = SelectConfig { method: name.into(), budget: Budget::Ratio(0.5), ..Default::default() };
            let err = Selector::new(cfg)
                .unwrap()
                .select(&SelectionInput { features: &f, views: &views, signals: &Signals::default() })
                .unwrap_err();
            assert!(matches!(err, Error::MissingSignal { .. }), "{name}: {err}");
            assert!(err.to_string().contains(signal), "{name}: {err}");
        }
    }

    #[test]
    fn budgets_parse() {
        assert_eq!("0.25".parse::<Budget>().unwrap(), Budget::Ratio(0.25));
        assert_eq!("64".parse::<Budget>().unwrap(), Budget::Count(64));
        assert_eq!("1".parse::<Budget>().unwrap(), Budget::Ratio(1.0));
        assert!("0".parse::<Budget>().is_err() && "1.5".parse::<Budget>().is_err() && "x".parse::<Budget>().is_err());
        assert!(Selector::new(SelectConfig { method: "magic".into(), ..Default::default() }).is_err());
    }

    #[test]
    fn proportional_split_adds_up() {
        let views = vec![view(64), view(16), view(64)];
        let q = proportional(&views, 37);
        assert_eq!(q.iter().sum::<usize>(), 37);
        assert!(q[1] <= q[0] && q[1] <= q[2]);
    }
}
