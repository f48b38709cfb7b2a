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
    /// `(view, index in view) -> how many original rows the kept row stands for` (pooled summary
    /// rows of `SelectConfig::pool`; 1 when absent). The language model gives such a row
    /// `ln(weight)` more attention logit (proportional attention).
    pub weights: BTreeMap<(usize, usize), f32>,
}

impl Selection {
    /// Keeps every row of every view.
    pub fn all(views: &[View]) -> Self {
        Selection { kept: views.iter().map(|v| (0..v.tokens).collect()).collect(), ..Default::default() }
    }

    /// The additive attention bias of each gathered row (`ln(weight)`, in [`Selection::gather`]'s
    /// order), or None when every row stands for itself.
    pub fn key_bias(&self) -> Option<Vec<f32>> {
        if self.weights.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(self.total());
        for (v, kept) in self.kept.iter().enumerate() {
            out.extend(kept.iter().map(|&i| self.weights.get(&(v, i)).map_or(0.0, |w| w.ln())));
        }
        Some(out)
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

    /// Chooses the rows to keep. With `pool` summary rows per view, the method chooses that many
    /// fewer, and each view's dropped rows are pooled into them ([`pool_dropped`]): the budget
    /// counts them.
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
        let pool = self.config.pool;
        // rows the pooled summaries take out of each view's share (at least one row stays chosen)
        let reserve = |k: usize| k.saturating_sub(1).min(pool);
        let live = input.views.iter().filter(|v| v.tokens > 0).count();
        let (mut sel, quotas) = if let Some(sel) = method.select_views(input, self.reduced(n, live, pool)) {
            (sel?, None)
        } else {
            self.choose(input, method.as_ref(), n, &reserve)?
        };
        if pool > 0 {
            // what the budget leaves after the method's rows: per view under a per-view split,
            // else over all views in order
            let room: Vec<usize> = match quotas {
                Some(q) => q.iter().zip(&sel.kept).map(|(q, k)| q.saturating_sub(k.len()).min(pool)).collect(),
                None => {
                    let mut left = self.config.budget.of(n).saturating_sub(sel.total());
                    input
                        .views
                        .iter()
                        .zip(&sel.kept)
                        .map(|(v, k)| {
                            let r = pool.min(v.tokens.saturating_sub(k.len())).min(left);
                            left -= r;
                            r
                        })
                        .collect()
                }
            };
            pool_dropped(&mut sel, input, &room);
        }
        Ok(sel)
    }

    /// The global budget less `pool` rows for each of `views` views, as a count.
    fn reduced(&self, n: usize, views: usize, pool: usize) -> super::Budget {
        if pool == 0 {
            return self.config.budget;
        }
        let k = self.config.budget.of(n);
        super::Budget::Count(k.saturating_sub(pool * views).max(views.max(1)))
    }

    /// Runs the method under the budget and scope; `reserve(k)` rows of a view's share `k` are
    /// left to the pooled summaries. Returns the per-view shares when the budget was split.
    fn choose(
        &self,
        input: &SelectionInput<'_>,
        method: &dyn Method,
        n: usize,
        reserve: &dyn Fn(usize) -> usize,
    ) -> Result<(Selection, Option<Vec<usize>>)> {
        let per_view = self.config.scope == Scope::PerView || method.per_view_only();
        let mut sel = Selection { kept: vec![Vec::new(); input.views.len()], ..Default::default() };
        if per_view {
            let quotas: Vec<usize> = match (self.config.scope, self.config.budget) {
                (Scope::PerView, b) => input.views.iter().map(|v| b.of(v.tokens)).collect(),
                (Scope::Global, b) => proportional(input.views, b.of(n)),
            };
            let mut offset = 0;
            for (vi, (view, &k)) in input.views.iter().zip(&quotas).enumerate() {
                let range = offset..offset + view.tokens;
                offset += view.tokens;
                let rows = self.rows(input, method, range.clone(), Some(view.grid))?;
                let k = if k < view.tokens { k - reserve(k) } else { k };
                let chosen = run(method, &rows, k)?;
                for (i, new) in chosen.replaced {
                    sel.replaced.insert((vi, i), new);
                }
                sel.kept[vi] = chosen.indices;
            }
            return Ok((sel, Some(quotas)));
        } else {
            let rows = self.rows(input, method, 0..n, None)?;
            let live = input.views.iter().filter(|v| v.tokens > 0).count();
            let chosen = run(method, &rows, self.reduced(n, live, self.config.pool).of(n))?;
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
        Ok((sel, None))
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

/// Pools each view's dropped rows into summary rows, `room[v]` for view `v` (at most one per
/// dropped row): the dropped rows in raster order are cut into that many runs of near-equal length (the first runs one longer); each run is
/// kept as its middle row carrying the run's mean feature and the run's length as its weight,
/// so the language model attends to it as much as to the run (proportional attention) and the
/// background that informed methods drop still holds its share of attention. Measured in
/// docs/pruning.md ("Why pruned answers did not stop").
pub fn pool_dropped(sel: &mut Selection, input: &SelectionInput<'_>, room: &[usize]) {
    let starts = crate::family::view_starts(input.views);
    for (v, view) in input.views.iter().enumerate() {
        let mut is_kept = vec![false; view.tokens];
        for &i in &sel.kept[v] {
            if let Some(k) = is_kept.get_mut(i) {
                *k = true;
            }
        }
        let dropped: Vec<usize> = (0..view.tokens).filter(|&i| !is_kept[i]).collect();
        let runs = room.get(v).copied().unwrap_or(0).min(dropped.len());
        if runs == 0 {
            continue;
        }
        let (base, extra) = (dropped.len() / runs, dropped.len() % runs);
        let mut at = 0;
        for r in 0..runs {
            let len = base + usize::from(r < extra);
            let run = &dropped[at..at + len];
            at += len;
            let rows: Vec<usize> = run.iter().map(|&i| starts[v] + i).collect();
            let Some(mean) = input.features.select(Axis(0), &rows).mean_axis(Axis(0)) else { continue };
            let anchor = run[len / 2];
            sel.replaced.insert((v, anchor), mean);
            sel.weights.insert((v, anchor), len as f32);
            sel.kept[v].push(anchor);
        }
        sel.kept[v].sort_unstable();
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

    #[test]
    fn pooled_summaries_fit_the_budget_and_cover_every_dropped_row_once() {
        let views = [view(36), quadrant_tile(0, 0, 8), view(25)];
        let n: usize = views.iter().map(|v| v.tokens).sum();
        let f = features(n, 6, 11);
        let signals = all_signals(&views, 6);
        let input = SelectionInput { features: &f, views: &views, signals: &signals };
        for method in ["divprune", "dart", "random", "visionzip"] {
            for (keep, scope) in [(0.25, Scope::Global), (0.3, Scope::PerView), (0.5, Scope::Global)] {
                for pool in [1, 3, 8] {
                    let budget = Budget::Ratio(keep);
                    let plain = SelectConfig { method: method.into(), budget, scope, ..Default::default() };
                    let want = Selector::new(plain).unwrap().select(&input).unwrap().total();
                    let cfg = SelectConfig { method: method.into(), budget, scope, pool, ..Default::default() };
                    let sel = Selector::new(cfg).unwrap().select(&input).unwrap();
                    let what = format!("{method} keep {keep} {scope:?} pool {pool}");
                    assert_eq!(sel.total(), want, "{what}: the budget counts the summaries");
                    let bias = sel.key_bias().expect("weights");
                    assert_eq!(bias.len(), sel.total());
                    for (v, view) in views.iter().enumerate() {
                        let kept = &sel.kept[v];
                        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{what}: raster order");
                        let summaries: Vec<_> = kept.iter().filter(|&&i| sel.weights.contains_key(&(v, i))).collect();
                        assert!(summaries.len() <= pool, "{what}: view {v} has {} summaries", summaries.len());
                        // unweighted rows stand for themselves, summaries for their runs: every row once
                        let stood: f32 = kept.iter().map(|&i| sel.weights.get(&(v, i)).copied().unwrap_or(1.0)).sum();
                        assert_eq!(stood as usize, view.tokens, "{what}: view {v}");
                        for &&i in &summaries {
                            let w = sel.weights[&(v, i)];
                            assert!(w >= 1.0);
                            let new = &sel.replaced[&(v, i)];
                            assert_eq!(new.len(), 6);
                            assert!(new.iter().all(|x| x.is_finite()));
                        }
                    }
                }
            }
        }
        // one run of the dropped rows: the summary is their mean, at the run's middle row
        let views = [view(16)];
        let f = features(16, 4, 5);
        let signals = Signals::default();
        let input = SelectionInput { features: &f, views: &views, signals: &signals };
        let mut sel = Selection { kept: vec![vec![0, 5, 9]], ..Default::default() };
        pool_dropped(&mut sel, &input, &[1]);
        let dropped: Vec<usize> = (0..16).filter(|i| ![0, 5, 9].contains(i)).collect();
        let anchor = dropped[dropped.len() / 2];
        assert!(sel.kept[0].contains(&anchor));
        assert_eq!(sel.weights[&(0, anchor)], 13.0);
        let mean = f.select(Axis(0), &dropped).mean_axis(Axis(0)).unwrap();
        assert_eq!(sel.replaced[&(0, anchor)], mean);
        let bias = sel.key_bias().unwrap();
        let at = sel.kept[0].iter().position(|&i| i == anchor).unwrap();
        assert!((bias[at] - 13f32.ln()).abs() < 1e-6);
        assert_eq!(bias.iter().filter(|&&b| b != 0.0).count(), 1);
    }

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
