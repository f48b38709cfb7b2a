//! Accuracy evaluation on a question set: every question through the pipeline, exact-match
//! scoring, accuracy overall and per question type with 95% Wilson intervals, and the mean
//! visual tokens kept and time to first token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::GenerationOptions;
use crate::pipeline::{EncodedImage, ImageInput, Pipeline, Quiet, Request, Stage, StageTimes};

/// One question of an eval set (`questions.jsonl`, one object per line).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Question {
    pub id: i64,
    /// Image path relative to the eval set folder.
    pub image: String,
    pub question: String,
    pub answer: String,
    /// Question type (`color`, `count`, `left_right`, ...).
    #[serde(rename = "type")]
    pub kind: String,
}

/// An eval set: a folder with `questions.jsonl` and its images.
#[derive(Debug, Clone)]
pub struct EvalSet {
    pub dir: PathBuf,
    pub questions: Vec<Question>,
}

impl EvalSet {
    /// Reads `DIR/questions.jsonl`; every line must parse and name an existing image.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("questions.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile { path: path.clone(), what: "eval questions".into() },
            _ => Error::Io { path: path.clone(), source },
        })?;
        let mut questions = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let q: Question = serde_json::from_str(line)
                .map_err(|e| Error::field(&path, format!("line {}", i + 1), e.to_string()))?;
            questions.push(q);
        }
        if questions.is_empty() {
            return Err(Error::field(&path, "questions", "the file holds no question"));
        }
        Ok(EvalSet { dir, questions })
    }

    /// The image file of a question.
    pub fn image_path(&self, q: &Question) -> PathBuf {
        self.dir.join(&q.image)
    }
}

/// Normalises an answer for exact match: trimmed, lower-case, trailing punctuation removed.
pub fn normalize_answer(s: &str) -> String {
    s.trim().trim_end_matches(['.', '!', '?', ',']).trim().to_lowercase()
}

/// Accuracy with a 95% confidence interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Wilson score interval, 95%.
    pub ci95: [f64; 2],
}

impl Accuracy {
    /// From counts.
    pub fn new(correct: usize, total: usize) -> Self {
        let (lo, hi) = wilson(correct, total);
        Accuracy {
            correct,
            total,
            accuracy: if total == 0 { 0.0 } else { correct as f64 / total as f64 },
            ci95: [lo, hi],
        }
    }
}

/// Wilson score interval at 95% (z = 1.96).
pub fn wilson(correct: usize, total: usize) -> (f64, f64) {
    if total == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = total as f64;
    let p = correct as f64 / n;
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// One scored question.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub answer: String,
    pub predicted: String,
    pub correct: bool,
    pub visual_tokens: usize,
    pub visual_tokens_kept: usize,
    pub ttft_ms: f64,
    /// Whether the answer ended with end-of-sequence (not the token budget).
    pub stopped: bool,
    /// The question's text tokens before and after the prompt compressor (when one ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_text_tokens: Option<(usize, usize)>,
}

/// The result of an eval run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub overall: Accuracy,
    pub by_type: BTreeMap<String, Accuracy>,
    /// Answers longer than the expected one ("above red" for "above"), the symptom of pruned
    /// answers that do not stop (docs/pruning.md).
    pub overlong: usize,
    /// Answers that ran to the token budget without end-of-sequence.
    pub unstopped: usize,
    pub mean_visual_tokens: f64,
    pub mean_visual_tokens_kept: f64,
    pub mean_ttft_ms: f64,
    /// Mean time of each stage, ms.
    pub mean_stage_ms: BTreeMap<String, f64>,
    /// Mean text tokens of the questions before and after the prompt compressor, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_prompt_text_tokens: Option<(f64, f64)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<Prediction>,
}

/// Options of an eval run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Tokens generated per answer (answers are one word).
    pub max_new_tokens: usize,
    /// Evaluate only the first N questions.
    pub limit: Option<usize>,
    /// Keep per-question predictions in the report.
    pub keep_predictions: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { max_new_tokens: 8, limit: None, keep_predictions: false }
    }
}

/// Runs every question (greedy) and scores it; `progress(done, total)` after each.
pub fn evaluate(
    pipeline: &Pipeline,
    set: &EvalSet,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    let n = opts.limit.map_or(set.questions.len(), |l| l.min(set.questions.len()));
    let gen = GenerationOptions { max_new_tokens: opts.max_new_tokens, ..Default::default() };
    let mut predictions = Vec::with_capacity(n);
    let mut stage_sum = StageTimes::default();
    // consecutive questions about one picture share its decoded image and, without tile skipping
    // (whose tiles depend on the question), its encoding; every question still reports the
    // measured decode, preprocess and encode times of that picture
    let reuse_encoding = !pipeline.encoding_depends_on_prompt();
    let mut cache: Option<(String, image::RgbImage, Option<EncodedImage>, std::time::Duration)> = None;
    for (i, q) in set.questions[..n].iter().enumerate() {
        let entry = match cache.take() {
            Some(c) if c.0 == q.image => c,
            _ => {
                let t = std::time::Instant::now();
                let img = pipeline.load_image(&set.image_path(q))?;
                let decode = t.elapsed();
                let encoded = if reuse_encoding { Some(pipeline.encode_image(&img)?) } else { None };
                (q.image.clone(), img, encoded, decode)
            }
        };
        let (_, img, encoded, decode) = cache.insert(entry);
        let image = match encoded {
            Some(e) => ImageInput::Encoded(e),
            None => ImageInput::Decoded(img),
        };
        let mut answer = pipeline.answer(&Request::new(&q.question).with_image(image), &gen, &mut Quiet)?;
        // the picture was decoded once for its questions; each reports that decode time
        answer.stats.times.image_decode = *decode;
        answer.stats.ttft_ms = answer.stats.times.ttft().as_secs_f64() * 1e3;
        let t = &answer.stats.times;
        for stage in Stage::ALL {
            *stage_sum.slot_mut(stage) += t.get(stage);
        }
        let predicted = normalize_answer(&answer.text);
        predictions.push(Prediction {
            id: q.id,
            kind: q.kind.clone(),
            correct: predicted == normalize_answer(&q.answer),
            answer: q.answer.clone(),
            predicted,
            visual_tokens: answer.stats.visual_tokens,
            visual_tokens_kept: answer.stats.visual_tokens_kept,
            ttft_ms: answer.stats.ttft_ms,
            stopped: answer.stats.stop == crate::generate::StopReason::Eos,
            prompt_text_tokens: answer
                .stats
                .prompt_compression
                .as_ref()
                .map(|c| (c.text_tokens_before, c.text_tokens_after)),
        });
        progress(i + 1, n);
    }
    Ok(report(predictions, stage_sum, opts.keep_predictions))
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn report(predictions: Vec<Prediction>, stage_sum: StageTimes, keep: bool) -> EvalReport {
    let n = predictions.len().max(1) as f64;
    let mut by: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in &predictions {
        let e = by.entry(p.kind.clone()).or_default();
        e.0 += p.correct as usize;
        e.1 += 1;
    }
    let correct = predictions.iter().filter(|p| p.correct).count();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n;
    let mean_stage_ms = Stage::ALL.iter().map(|&s| (s.name().to_string(), ms(stage_sum.get(s)))).collect();
    EvalReport {
        overall: Accuracy::new(correct, predictions.len()),
        by_type: by.into_iter().map(|(k, (c, t))| (k, Accuracy::new(c, t))).collect(),
        overlong: predictions.iter().filter(|p| words(&p.predicted) > words(&p.answer)).count(),
        unstopped: predictions.iter().filter(|p| !p.stopped).count(),
        mean_visual_tokens: predictions.iter().map(|p| p.visual_tokens as f64).sum::<f64>() / n,
        mean_visual_tokens_kept: predictions.iter().map(|p| p.visual_tokens_kept as f64).sum::<f64>() / n,
        mean_ttft_ms: predictions.iter().map(|p| p.ttft_ms).sum::<f64>() / n,
        mean_stage_ms,
        mean_prompt_text_tokens: predictions.iter().map(|p| p.prompt_text_tokens).collect::<Option<Vec<_>>>().and_then(
            |v| {
                let m = v.len() as f64;
                (!v.is_empty()).then(|| {
                    (v.iter().map(|t| t.0 as f64).sum::<f64>() / m, v.iter().map(|t| t.1 as f64).sum::<f64>() / m)
                })
            },
        ),
        predictions: if keep { predictions } else { Vec::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_brackets_the_rate() {
        let (lo, hi) = wilson(90, 100);
        assert!(lo < 0.9 && hi > 0.9);
        assert!((lo - 0.8256).abs() < 1e-3 && (hi - 0.9448).abs() < 1e-3, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson(10, 10);
        assert!(hi <= 1.0 && lo > 0.7);
    }

    #[test]
    fn answers_normalise() {
        assert_eq!(normalize_answer("  Red.\n"), "red");
        assert_eq!(normalize_answer("yes"), "yes");
        assert_ne!(normalize_answer("red square"), "red");
    }
}
