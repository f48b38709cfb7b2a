//! Stop sequences: an [`Observer`] wrapper that ends generation when the answer contains one of
//! a few strings, and passes on only text that cannot be the start of one (so a streamed answer
//! never shows a stop sequence, or part of one, that is then taken back). OpenAI's `stop`.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::pipeline::{Observer, Stage};

/// Most stop sequences per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// Wraps an observer; the answer it lets through ends before the first stop sequence.
pub struct StopAt<'o> {
    stops: Vec<String>,
    inner: &'o mut dyn Observer,
    /// Everything generated so far (cut at the stop sequence once one is found).
    text: String,
    /// Bytes of `text` already passed on.
    emitted: usize,
    hit: bool,
}

impl<'o> StopAt<'o> {
    /// Checks the sequences (at most [`MAX_STOPS`], none empty) and wraps `inner`.
    pub fn new(stops: Vec<String>, inner: &'o mut dyn Observer) -> Result<Self> {
        if stops.len() > MAX_STOPS {
            return Err(Error::invalid("stop", stops.len(), format!("at most {MAX_STOPS} stop sequences")));
        }
        if stops.iter().any(String::is_empty) {
            return Err(Error::invalid("stop", "", "a stop sequence cannot be empty"));
        }
        Ok(StopAt { stops, inner, text: String::new(), emitted: 0, hit: false })
    }

    /// Whether a stop sequence ended the answer.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// Passes on what was held back (generation ended without a stop sequence) and returns the
    /// answer: the generated text up to, not including, the first stop sequence.
    pub fn finish(self) -> String {
        if !self.hit && self.emitted < self.text.len() {
            self.inner.text(&self.text[self.emitted..]);
        }
        self.text
    }

    /// Bytes at the end of `text` that could begin a stop sequence (held back until known).
    fn held(&self) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > held && self.text.ends_with(&stop[..i]) {
                    held = i;
                }
            }
        }
        held
    }
}

impl Observer for StopAt<'_> {
    fn stage(&mut self, stage: Stage, took: Duration) {
        self.inner.stage(stage, took)
    }

    fn text(&mut self, piece: &str) {
        if self.hit {
            return;
        }
        // a stop sequence may straddle pieces: search from where the longest could start
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(longest);
        self.text.push_str(piece);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        let end = match found {
            Some(at) => {
                self.text.truncate(at);
                self.hit = true;
                at
            }
            None => self.text.len() - self.held(),
        };
        if end > self.emitted {
            self.inner.text(&self.text[self.emitted..end]);
            self.emitted = end;
        }
    }

    fn cancelled(&mut self) -> bool {
        self.hit || self.inner.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Vec<String>);
    impl Observer for Collect {
        fn text(&mut self, piece: &str) {
            self.0.push(piece.to_string());
        }
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, Vec<String>) {
        let mut sink = Collect::default();
        let mut stop = StopAt::new(stops.iter().map(|s| s.to_string()).collect(), &mut sink).unwrap();
        for p in pieces {
            stop.text(p);
            if stop.cancelled() {
                break;
            }
        }
        let hit = stop.hit();
        let text = stop.finish();
        (text, hit, sink.0)
    }

    #[test]
    fn stops_at_a_sequence_split_across_pieces_and_never_shows_it() {
        let (text, hit, seen) = run(&["END"], &["a cat E", "N", "D and more"]);
        assert_eq!(text, "a cat ");
        assert!(hit);
        assert_eq!(seen.concat(), "a cat ");
        // the "E" that could start END was held back, not shown and taken back
        assert!(seen.iter().all(|p| !p.contains('E')));
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_stop() {
        let (text, hit, seen) = run(&["END"], &["a cat E", "gg", " E"]);
        assert!(!hit);
        assert_eq!(text, "a cat Egg E");
        assert_eq!(seen.concat(), "a cat Egg E");
    }

    #[test]
    fn the_earliest_of_several_sequences_wins_and_multibyte_text_is_cut_on_boundaries() {
        let (text, hit, _) = run(&["ß!", "\n"], &["größe\nzwei ß!"]);
        assert!(hit);
        assert_eq!(text, "größe");
        let (text, _, seen) = run(&["é"], &["caf", "é au lait"]);
        assert_eq!(text, "caf");
        assert_eq!(seen.concat(), "caf");
    }

    #[test]
    fn bad_sequences_are_refused() {
        let mut sink = Collect::default();
        assert!(StopAt::new(vec![String::new()], &mut sink).is_err());
        let five = (0..5).map(|i| i.to_string()).collect();
        assert!(StopAt::new(five, &mut sink).is_err());
    }
}
