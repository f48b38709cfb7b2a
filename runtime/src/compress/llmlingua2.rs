//! LLMLingua-2 prompt compression, as the `llmlingua` package (0.2.2) runs it for one context:
//! chunk the text to the model's length, keep probability = softmax(logits)[.., keep] per token,
//! tokens merged into words (mean probability), force tokens and digits kept, then the words
//! whose probability is above a percentile of the cl100k-token-weighted probabilities survive,
//! in their original order. The steps and the reference's numeric quirks are written down in
//! tools/export/glimpse_export/compressor/ALGORITHM.md; `tests/compressor.rs` checks the words
//! kept against fixtures that the reference recorded.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use tokenizers::{Decoder, Tokenizer};

use super::CompressorManifest;
use crate::backend::{Backend, LoadHints, Session, Tensor};
use crate::error::{Error, Result};

/// Python's `string.punctuation`: a token that is a substring of it starts a new word.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// What to compress to, and which words must survive.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// Fraction of the text's (cl100k) tokens to keep, in (0, 1].
    pub rate: f64,
    /// Keep about this many cl100k tokens instead of `rate` (`None`: use `rate`).
    pub target_tokens: Option<usize>,
    /// Tokens always kept (`"\n"`, `"?"`, ...).
    pub force_tokens: Vec<String>,
    /// Keep every word with a digit in it.
    pub force_digits: bool,
    /// Drop a force token repeated with no kept word between.
    pub drop_consecutive: bool,
}

impl CompressOptions {
    /// Refuses settings no compression can meet (a rate outside (0, 1]).
    pub fn check(&self) -> Result<()> {
        if !(self.rate > 0.0 && self.rate <= 1.0) {
            return Err(Error::invalid("prompt-rate", self.rate, "must be in (0, 1]"));
        }
        Ok(())
    }
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            rate: 0.5,
            target_tokens: None,
            force_tokens: Vec::new(),
            force_digits: false,
            drop_consecutive: false,
        }
    }
}

/// A compressed prompt and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Compressed {
    pub text: String,
    /// cl100k tokens before and after (the reference's count).
    pub origin_tokens: usize,
    pub compressed_tokens: usize,
    /// Every word the classifier saw, with whether it was kept.
    pub words: Vec<(String, bool)>,
    /// Wall time of the compression (tokenizing, the classifier, the word choice).
    pub took: std::time::Duration,
}

/// A probability as the reference holds it: a float32 from the model, or a Python float (a
/// forced 1.0, a dropped 0.0). numpy's percentile runs in float64 as soon as one Python float is
/// in the list, in float32 otherwise, and the threshold's last bits decide ties.
#[derive(Debug, Clone, Copy, PartialEq)]
enum P {
    F32(f32),
    F64(f64),
}

impl P {
    fn get(self) -> f64 {
        match self {
            P::F32(x) => x as f64,
            P::F64(x) => x,
        }
    }
}

/// A loaded LLMLingua-2 compressor folder.
pub struct PromptCompressor {
    dir: PathBuf,
    manifest: CompressorManifest,
    tokenizer: Tokenizer,
    session: Box<dyn Session>,
    cl100k: tiktoken_rs::CoreBPE,
    cls: i64,
    sep: i64,
    unk: String,
}

impl std::fmt::Debug for PromptCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCompressor").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl PromptCompressor {
    /// Opens a compressor folder: its manifest, its tokenizer (whose vocabulary must be the
    /// model's) and its ONNX file on `backend`.
    pub fn load(dir: &Path, backend: &dyn Backend) -> Result<PromptCompressor> {
        let manifest = CompressorManifest::load(dir)?;
        let tokenizer = super::load_tokenizer(dir, &manifest)?;
        let onnx = dir.join(&manifest.onnx);
        // one row at a time: a fixed batch of 1 lets tract type the attention-mask expansion
        let hints = LoadHints::default().dim("input_ids", 0, 1).dim("attention_mask", 0, 1);
        let session = backend.load(&onnx, dir, "prompt_compressor", &hints)?;
        for name in ["input_ids", "attention_mask"] {
            if !session.inputs().iter().any(|i| i.name == name) {
                return Err(Error::interface("prompt_compressor", format!("{}: no `{name}` input", onnx.display())));
            }
        }
        if session.outputs().is_empty() {
            return Err(Error::interface("prompt_compressor", format!("{}: no outputs", onnx.display())));
        }
        let cl100k = tiktoken_rs::cl100k_base()
            .map_err(|e| Error::interface("prompt_compressor", format!("cl100k_base token counter: {e}")))?;
        let tok = &manifest.llmlingua.dataset_tokens;
        let (cls, sep) = (tok["cls"].id, tok["sep"].id);
        let unk = manifest.llmlingua.skip_tokens.iter().find(|t| t.contains("unk") || t.contains("UNK")).cloned();
        Ok(PromptCompressor {
            dir: dir.to_path_buf(),
            tokenizer,
            session,
            cl100k,
            cls,
            sep,
            unk: unk.unwrap_or_default(),
            manifest,
        })
    }

    /// Where the classifier runs.
    pub fn placement(&self) -> crate::backend::Placement {
        self.session.placement()
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// cl100k tokens in `text`, the reference's count.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.cl100k.encode_ordinary(text).len()
    }

    fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.dir.join(&self.manifest.tokenizer), message: e.to_string() })?;
        Ok(enc.get_tokens().to_vec())
    }

    fn detokenize(&self, tokens: &[String]) -> Result<String> {
        let path = || self.dir.join(&self.manifest.tokenizer);
        match self.tokenizer.get_decoder() {
            Some(d) => d.decode(tokens.to_vec()).map_err(|e| Error::Tokenizer { path: path(), message: e.to_string() }),
            None => Ok(tokens.concat()),
        }
    }

    /// Keep probabilities of one row of token ids.
    fn keep_probabilities(&self, ids: &[i64]) -> Result<Vec<f32>> {
        let n = ids.len();
        let shape = IxDyn(&[1, n]);
        let ids_t = ArrayD::from_shape_vec(shape.clone(), ids.to_vec())
            .map_err(|e| Error::interface("prompt_compressor", e.to_string()))?;
        let mask = ArrayD::from_elem(shape, 1i64);
        let out = self.session.run(vec![("input_ids", Tensor::I64(ids_t)), ("attention_mask", Tensor::I64(mask))])?;
        let logits = out
            .into_iter()
            .next()
            .ok_or_else(|| Error::interface("prompt_compressor", "no logits"))?
            .into_f32("logits")?;
        if logits.shape() != [1, n, 2] {
            return Err(Error::interface(
                "prompt_compressor",
                format!("logits of shape {:?}, expected [1, {n}, 2]", logits.shape()),
            ));
        }
        let k = self.manifest.keep_label;
        Ok((0..n)
            .map(|t| {
                let (a, b) = (logits[[0, t, 0]], logits[[0, t, 1]]);
                let m = a.max(b);
                let (ea, eb) = ((a - m).exp(), (b - m).exp());
                let s = ea + eb;
                if k == 1 {
                    eb / s
                } else {
                    ea / s
                }
            })
            .collect())
    }

    /// Compresses one text, as `llmlingua`'s `compress_prompt(context, rate=..., use_llmlingua2)`.
    pub fn compress(&self, text: &str, opts: &CompressOptions) -> Result<Compressed> {
        let started = std::time::Instant::now();
        let mut out = self.compress_untimed(text, opts)?;
        out.took = started.elapsed();
        Ok(out)
    }

    fn compress_untimed(&self, text: &str, opts: &CompressOptions) -> Result<Compressed> {
        opts.check()?;
        let lingua = &self.manifest.llmlingua;
        // force tokens that are not one token become [NEWi] placeholders
        let mut token_map: Vec<(String, String)> = Vec::new();
        for (i, t) in opts.force_tokens.iter().enumerate() {
            if self.tokenize(t)?.len() != 1 {
                if i >= lingua.force_token_names.count {
                    return Err(Error::invalid(
                        "force token",
                        t,
                        format!("at most {} force tokens of several pieces", lingua.force_token_names.count),
                    ));
                }
                token_map.push((t.clone(), lingua.force_token_names.format.replace("{i}", &i.to_string())));
            }
        }
        let mut chunk_end: Vec<String> = lingua.chunk_end_tokens.clone();
        for c in &lingua.chunk_end_tokens {
            if let Some((_, new)) = token_map.iter().find(|(o, _)| o == c) {
                chunk_end.push(new.clone());
            }
        }
        let origin_tokens = self.count_tokens(text);
        let mut replaced = text.to_string();
        for (o, new) in &token_map {
            replaced = replaced.replace(o.as_str(), new);
        }
        let chunks = self.chunk(&replaced, &chunk_end)?;
        let rate = match opts.target_tokens {
            Some(t) if t > 0 => (t as f64 / origin_tokens.max(1) as f64).min(1.0),
            _ => opts.rate,
        };
        let reduce = (1.0 - rate).max(0.0);
        if reduce <= 0.0 {
            let text: String = chunks.iter().map(|c| restore_force_tokens(c, &token_map)).collect();
            let compressed_tokens = self.count_tokens(&text);
            return Ok(Compressed {
                text,
                origin_tokens,
                compressed_tokens,
                words: Vec::new(),
                took: Default::default(),
            });
        }
        let mut out = String::new();
        let mut all_words = Vec::new();
        for chunk in &chunks {
            let (kept, words) = self.compress_chunk(chunk, reduce, opts, &token_map)?;
            out.push_str(&kept);
            all_words.extend(words);
        }
        let compressed_tokens = self.count_tokens(&out);
        Ok(Compressed { text: out, origin_tokens, compressed_tokens, words: all_words, took: Default::default() })
    }

    /// The reference's chunking: at most `max_seq_len - 2` tokens, cut back to the last chunk-end
    /// token, each chunk turned back into text.
    fn chunk(&self, text: &str, chunk_end: &[String]) -> Result<Vec<String>> {
        let toks = self.tokenize(text)?;
        let max_len = self.manifest.max_seq_len - 2;
        let n = toks.len();
        let mut st = 0;
        let mut out = Vec::new();
        while st < n {
            if st + max_len > n - 1 {
                out.push(self.detokenize(&toks[st..n])?);
                break;
            }
            let mut ed = st + max_len;
            for j in 0..ed - st {
                if chunk_end.contains(&toks[ed - j]) {
                    ed -= j;
                    break;
                }
            }
            out.push(self.detokenize(&toks[st..=ed])?);
            st = ed + 1;
        }
        Ok(out)
    }

    fn compress_chunk(
        &self,
        chunk: &str,
        reduce: f64,
        opts: &CompressOptions,
        token_map: &[(String, String)],
    ) -> Result<(String, Vec<(String, bool)>)> {
        let lingua = &self.manifest.llmlingua;
        let sentencepiece = lingua.word_rule == "sentencepiece";
        let unk_id = self.tokenizer.token_to_id(&self.unk).map(i64::from);
        let mut ids = vec![self.cls];
        for t in self.tokenize(chunk)? {
            let id = self.tokenizer.token_to_id(&t).map(i64::from).or(unk_id).unwrap_or(self.cls);
            ids.push(id);
        }
        ids.push(self.sep);
        ids.truncate(self.manifest.max_seq_len);
        let probs = self.keep_probabilities(&ids)?;
        let is_force = |s: &str| opts.force_tokens.iter().any(|f| f == s) || token_map.iter().any(|(_, n)| n == s);
        let pure = |t: &str| {
            if sentencepiece {
                t.trim_start_matches('\u{2581}').to_string()
            } else {
                t.trim_start_matches('#').to_string()
            }
        };
        let has_digit = |t: &str| opts.force_digits && t.chars().any(|c| c.is_ascii_digit());
        let mut words: Vec<String> = Vec::new();
        let mut word_probs: Vec<Vec<P>> = Vec::new();
        for (&id, &p) in ids.iter().zip(&probs) {
            let token = self.tokenizer.id_to_token(id as u32).unwrap_or_else(|| self.unk.clone());
            if lingua.skip_tokens.contains(&token) {
                continue;
            }
            let begins = if sentencepiece {
                PUNCTUATION.contains(token.as_str()) || is_force(&token) || token.starts_with('\u{2581}')
            } else {
                is_force(token.trim_start_matches('#')) || !token.starts_with("##")
            };
            if begins || words.is_empty() {
                let p = if is_force(&pure(&token)) { P::F64(1.0) } else { P::F32(p) };
                let word = restore_force_tokens(&token, token_map);
                word_probs.push(vec![if has_digit(&word) { P::F64(1.0) } else { p }]);
                words.push(word);
            } else if let (Some(w), Some(ps)) = (words.last_mut(), word_probs.last_mut()) {
                w.push_str(&pure(&token));
                ps.push(if has_digit(&token) { P::F64(1.0) } else { P::F32(p) });
            }
        }
        let mut wp: Vec<P> = word_probs.iter().map(|ps| mean(ps)).collect();
        if opts.drop_consecutive {
            let t0 = percentile(&wp, (100.0 * reduce) as i64);
            let (mut between, mut prev): (bool, Option<&str>) = (false, None);
            for (i, w) in words.iter().enumerate() {
                if opts.force_tokens.iter().any(|f| f == w) {
                    if between {
                        between = false;
                    } else if prev == Some(w.as_str()) {
                        wp[i] = P::F64(0.0);
                    }
                    prev = Some(w);
                } else {
                    between |= wp[i].get() > t0;
                }
            }
        }
        let mut weights = Vec::new();
        for (w, p) in words.iter().zip(&wp) {
            weights.extend(std::iter::repeat_n(*p, self.count_tokens(w)));
        }
        let thr = percentile(&weights, (100.0 * reduce + 1.0) as i64);
        let mut kept: Vec<String> = Vec::new();
        let mut labels = Vec::new();
        for (w, p) in words.iter().zip(&wp) {
            let p = p.get();
            let keep = p > thr || (thr == 1.0 && p == thr);
            let repeat = opts.drop_consecutive && opts.force_tokens.iter().any(|f| f == w) && kept.last() == Some(w);
            labels.push(keep && !repeat);
            if keep && !repeat {
                kept.push(w.clone());
            }
        }
        let text = self.detokenize(&kept)?;
        let words = words
            .into_iter()
            .zip(labels)
            .map(|(w, l)| (if sentencepiece { w.trim_start_matches('\u{2581}').to_string() } else { w }, l))
            .collect();
        Ok((text, words))
    }
}

/// Each `[NEWi]` placeholder in `s` back to the force token it stands for (the reference's
/// `replace_added_token`).
fn restore_force_tokens(s: &str, token_map: &[(String, String)]) -> String {
    token_map.iter().fold(s.to_string(), |acc, (original, placeholder)| acc.replace(placeholder.as_str(), original))
}

/// `sum(ps) / len(ps)` as Python computes it over numpy float32 values and Python floats: in
/// float32 when any element is a float32, left to right.
fn mean(ps: &[P]) -> P {
    if ps.iter().any(|p| matches!(p, P::F32(_))) {
        let s = ps.iter().fold(0.0f32, |acc, p| acc + p.get() as f32);
        P::F32(s / ps.len() as f32)
    } else {
        P::F64(ps.iter().map(|p| p.get()).sum::<f64>() / ps.len() as f64)
    }
}

/// `np.percentile(values, q)` (linear), in float32 when every value is a float32, else float64.
fn percentile(values: &[P], q: i64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let f32_mode = values.iter().all(|p| matches!(p, P::F32(_)));
    let mut v: Vec<f64> = values.iter().map(|p| p.get()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let q = q as f64 / 100.0;
    let virt = n as f64 * q + (1.0 - q) - 1.0; // numpy: n*q + (1 + q*-1) - 1 (q*-1 == -q exactly)
    let lo = (virt.floor().max(0.0) as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let g = virt - lo as f64;
    if f32_mode {
        let (a, b, g) = (v[lo] as f32, v[hi] as f32, g as f32);
        let d = b - a;
        (if g >= 0.5 { b - d * (1.0 - g) } else { a + d * g }) as f64
    } else {
        let (a, b) = (v[lo], v[hi]);
        let d = b - a;
        if g >= 0.5 {
            b - d * (1.0 - g)
        } else {
            a + d * g
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_numpys_linear_rule() {
        let v: Vec<P> = [1.0, 2.0, 3.0, 4.0].iter().map(|&x| P::F64(x)).collect();
        assert_eq!(percentile(&v, 50), 2.5);
        assert_eq!(percentile(&v, 0), 1.0);
        assert_eq!(percentile(&v, 100), 4.0);
        assert!((percentile(&v, 51) - 2.53).abs() < 1e-12);
        let w = [P::F32(0.1), P::F32(0.7)];
        // numpy: g >= 0.5 interpolates down from the upper value, in float32
        assert_eq!(percentile(&w, 50), 0.4000000059604645);
    }

    #[test]
    fn the_mean_stays_float32_unless_every_token_was_forced() {
        assert!(matches!(mean(&[P::F32(0.5), P::F64(1.0)]), P::F32(x) if x == 0.75));
        assert!(matches!(mean(&[P::F64(1.0)]), P::F64(x) if x == 1.0));
    }
}
