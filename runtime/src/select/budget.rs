//! The budget of a selection: how many rows to keep ([`Budget`]), over which views
//! ([`Scope`]), with which method and knobs ([`SelectConfig`]).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::family::View;

/// How many rows to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fraction of the rows, in (0, 1].
    Ratio(f32),
    /// An absolute number of rows (over all views with a global scope, per view otherwise).
    Count(usize),
}

impl Budget {
    /// Rows to keep out of `n` (at least 1 when `n > 0`, at most `n`).
    pub fn of(&self, n: usize) -> usize {
        let k = match *self {
            Budget::Ratio(r) => (r as f64 * n as f64).round() as usize,
            Budget::Count(c) => c,
        };
        if n == 0 {
            0
        } else {
            k.clamp(1, n)
        }
    }

    /// Whether this budget keeps everything.
    pub fn is_full(&self) -> bool {
        matches!(*self, Budget::Ratio(r) if r >= 1.0)
    }
}

impl FromStr for Budget {
    type Err = Error;
    /// `0.25` is a ratio, `64` a count.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |m: &str| Error::invalid("keep", s, m);
        if let Ok(c) = s.parse::<usize>() {
            return match c {
                0 => Err(bad("must keep at least one token")),
                1 => Ok(Budget::Ratio(1.0)),
                c => Ok(Budget::Count(c)),
            };
        }
        let r: f32 = s.parse().map_err(|_| bad("expected a ratio in (0, 1] or a token count"))?;
        if !(r > 0.0 && r <= 1.0) {
            return Err(bad("a ratio must be in (0, 1]"));
        }
        Ok(Budget::Ratio(r))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{r}"),
            Budget::Count(c) => write!(f, "{c}"),
        }
    }
}

/// Whether the budget is spent over all views at once or split evenly across views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// One selection over the rows of every view together.
    #[default]
    Global,
    /// The same ratio (or count) within each view.
    PerView,
}

impl FromStr for Scope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "global" => Ok(Scope::Global),
            "per-view" | "per-tile" => Ok(Scope::PerView),
            _ => Err(Error::invalid("keep scope", s, "expected global or per-view")),
        }
    }
}

/// A selection request: method, budget, scope and method knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectConfig {
    pub method: String,
    pub budget: Budget,
    pub scope: Scope,
    /// Seed of seeded methods (`random`, `todre` without CLS).
    pub seed: u64,
    /// CDPruner relevance weight λ in the kernel λ·(r rᵀ)∘S + (1-λ)·S.
    pub lambda: f32,
    /// Summary rows per view that pool the rows the method dropped (0 = off); they count in the
    /// budget and need a decoder with an `attention_bias` input (proportional attention).
    pub pool: usize,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            method: "none".into(),
            budget: Budget::Ratio(1.0),
            scope: Scope::Global,
            seed: 0,
            lambda: 0.5,
            pool: 0,
        }
    }
}

/// Splits a global budget across views in proportion to their sizes (largest remainder).
pub fn proportional(views: &[View], k: usize) -> Vec<usize> {
    let n: usize = views.iter().map(|v| v.tokens).sum();
    if n == 0 {
        return vec![0; views.len()];
    }
    let exact: Vec<f64> = views.iter().map(|v| k as f64 * v.tokens as f64 / n as f64).collect();
    let mut q: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..views.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut left = k - q.iter().sum::<usize>();
    for &i in order.iter().cycle().take(views.len() * 2) {
        if left == 0 {
            break;
        }
        if q[i] < views[i].tokens {
            q[i] += 1;
            left -= 1;
        }
    }
    q
}
