//! Token selection: the stage between encode and splice that decides which visual feature rows
//! reach the language model. One file per method; [`by_name`] is the registry.

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::family::View;

/// What a selector sees: the features of one image and where they came from.
#[derive(Debug)]
pub struct SelectionInput<'a> {
    /// Feature rows `[N, d]`, views concatenated in order.
    pub features: &'a Array2<f32>,
    /// The views the rows belong to, in order (their `tokens` add up to N).
    pub views: &'a [View],
}

/// Which rows of each view are kept, as indices into that view, ascending (raster order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kept: Vec<Vec<usize>>,
}

impl Selection {
    /// Keeps every row of every view.
    pub fn all(views: &[View]) -> Self {
        Selection { kept: views.iter().map(|v| (0..v.tokens).collect()).collect() }
    }

    /// Rows kept per view.
    pub fn counts(&self) -> Vec<usize> {
        self.kept.iter().map(Vec::len).collect()
    }

    /// Total rows kept.
    pub fn total(&self) -> usize {
        self.kept.iter().map(Vec::len).sum()
    }

    /// Gathers the kept rows of `features` (views concatenated) into a new `[k, d]` array.
    pub fn gather(&self, features: &Array2<f32>, views: &[View]) -> Array2<f32> {
        let mut rows = Vec::with_capacity(self.total());
        let mut offset = 0;
        for (view, kept) in views.iter().zip(&self.kept) {
            rows.extend(kept.iter().map(|&i| offset + i));
            offset += view.tokens;
        }
        features.select(ndarray::Axis(0), &rows)
    }
}

/// A token-selection method.
pub trait Selector: Send + Sync {
    /// Method name as typed on the command line.
    fn name(&self) -> &'static str;
    /// Chooses the rows to keep.
    fn select(&self, input: &SelectionInput<'_>) -> Result<Selection>;
}

/// Keeps every token (no pruning).
#[derive(Debug, Default, Clone, Copy)]
pub struct KeepAll;

impl Selector for KeepAll {
    fn name(&self) -> &'static str {
        "none"
    }

    fn select(&self, input: &SelectionInput<'_>) -> Result<Selection> {
        Ok(Selection::all(input.views))
    }
}

/// Registered method names.
pub fn available() -> Vec<&'static str> {
    vec!["none"]
}

/// The selector registered under `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Selector>> {
    match name {
        "none" => Ok(Box::new(KeepAll)),
        other => Err(Error::invalid("pruning method", other, format!("available: {}", available().join(", ")))),
    }
}
