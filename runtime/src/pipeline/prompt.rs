//! Prompt expansion and splice: the rendered chat prompt with the image placeholder expanded to
//! the kept rows, tokenized, embedded, and the kept visual rows written into the image-token
//! positions, with the position-id policy applied.

use ndarray::{Array2, Array3, Axis};

use super::{KeptLayout, Pipeline};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::family::VisionInput;
use crate::select::Selection;

/// The language-model input after splicing.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Prompt token ids (image runs already sized to the kept rows).
    pub input_ids: Vec<i64>,
    /// Embeddings with image rows written into the image-token positions, `[1, seq, hidden]`.
    pub embeds: Array3<f32>,
    /// Position id of each prompt token.
    pub positions: Vec<i64>,
    /// Additive attention bias of each prompt token's key (`ln(weight)` of pooled summary rows,
    /// 0 elsewhere); None when no row is weighted.
    pub key_bias: Option<Vec<f32>>,
    /// Visual rows before selection.
    pub visual_tokens: usize,
    /// Visual rows spliced in.
    pub visual_tokens_kept: usize,
    /// Images the encoder ran on (0 without an image).
    pub views: usize,
    /// What was kept where (None without an image).
    pub layout: Option<KeptLayout>,
}

impl Pipeline {
    /// The language model's input embeddings of the raw prompt tokens, `[m, d]`.
    pub fn text_embeddings(&self, prompt: &str) -> Result<Array2<f32>> {
        let mut ids = self.tokenizer.encode_plain(prompt)?;
        if ids.is_empty() {
            ids.push(0);
        }
        let m = ids.len();
        let ids = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, m]), ids)
            .map_err(|e| Error::interface("embed_tokens", e.to_string()))?;
        let out = self.embed.run(vec![("input_ids", Tensor::I64(ids))])?;
        let e = out.into_iter().next().ok_or_else(|| Error::interface("embed_tokens", "no outputs"))?;
        let e = e.into_f32("embed_tokens")?;
        let d = *e.shape().last().unwrap_or(&0);
        e.into_shape_with_order((m, d)).map_err(|e| Error::interface("embed_tokens", e.to_string()))
    }

    /// Renders the user prompt with the chat template (or the family's fallback).
    pub fn render_prompt(&self, prompt: &str, with_image: bool) -> Result<String> {
        self.render_turns(&[], prompt, with_image)
    }

    /// Renders earlier turns and the user prompt with the chat template; the family's fallback
    /// (folders without a template) renders a single user turn only.
    pub fn render_turns(&self, history: &[super::Turn], prompt: &str, with_image: bool) -> Result<String> {
        match self.tokenizer.render_chat_turns(history, prompt, with_image)? {
            Some(s) => Ok(s),
            None if history.is_empty() => Ok(self.family.fallback_prompt(prompt, with_image)),
            None => Err(Error::invalid(
                "messages",
                format!("{} earlier turns", history.len()),
                "this model folder has no chat template, so only a single user message can be rendered",
            )),
        }
    }

    /// Expands the image placeholder of a rendered prompt and tokenizes it.
    pub fn expand_and_tokenize(&self, rendered: &str, image: Option<(&VisionInput, &[usize])>) -> Result<Vec<i64>> {
        let placeholder = self.family.image_placeholder();
        let found = rendered.matches(placeholder).count();
        let text = match image {
            Some((input, kept)) => {
                if found != 1 {
                    return Err(Error::invalid(
                        "prompt",
                        rendered,
                        format!("expected exactly one {placeholder} placeholder for one image, found {found}"),
                    ));
                }
                rendered.replacen(placeholder, &self.family.expand_image(input, kept), 1)
            }
            None => rendered.to_string(),
        };
        self.tokenizer.encode(&text)
    }

    /// Stage 4: tokens → embeddings with the kept image rows written into the image positions.
    pub fn splice(
        &self,
        input_ids: Vec<i64>,
        image_rows: Option<&Array2<f32>>,
        visual_tokens: usize,
        positions: Option<Vec<i64>>,
    ) -> Result<Prepared> {
        let (context, field) = &self.context;
        let image_id = self.family.image_token_id();
        let n_image = input_ids.iter().filter(|&&t| t == image_id).count();
        if input_ids.len() >= *context {
            return Err(Error::ContextOverflow {
                tokens: input_ids.len(),
                image_tokens: n_image,
                context: *context,
                field: field.clone(),
            });
        }
        let rows = image_rows.map_or(0, |r| r.nrows());
        if image_rows.is_none() && n_image > 0 {
            return Err(Error::invalid(
                "prompt",
                format!("{n_image} image token(s)"),
                format!(
                    "the prompt holds the image token (id {image_id}, `{}`) but no image was given: give an image, or leave the placeholder out of the text",
                    self.family.image_placeholder()
                ),
            ));
        }
        if image_rows.is_some() && n_image == 0 {
            return Err(Error::interface(
                "tokenizer",
                format!(
                    "the expanded prompt has no token with the image token id {image_id}: the tokenizer does not encode `{}` as that id",
                    self.family.image_placeholder()
                ),
            ));
        }
        if rows != n_image {
            return Err(Error::interface(
                "splice",
                format!("{n_image} image tokens in the prompt but {rows} feature rows"),
            ));
        }
        let seq = input_ids.len();
        let ids = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, seq]), input_ids.clone())
            .map_err(|e| Error::interface("embed_tokens", e.to_string()))?;
        let out = self.embed.run(vec![("input_ids", Tensor::I64(ids))])?;
        let embeds = out
            .into_iter()
            .next()
            .ok_or_else(|| Error::interface("embed_tokens", "no outputs"))?
            .into_f32("embed_tokens inputs_embeds")?;
        let hidden = *embeds.shape().last().unwrap_or(&0);
        let mut embeds = embeds
            .into_shape_with_order((1, seq, hidden))
            .map_err(|e| Error::interface("embed_tokens", format!("inputs_embeds: {e}")))?;
        if let Some(rows) = image_rows {
            if rows.ncols() != hidden {
                return Err(Error::interface(
                    "splice",
                    format!("image features have width {} but text embeddings {hidden}", rows.ncols()),
                ));
            }
            let mut next = 0;
            for (pos, &t) in input_ids.iter().enumerate() {
                if t == image_id {
                    embeds.slice_mut(ndarray::s![0, pos, ..]).assign(&rows.index_axis(Axis(0), next));
                    next += 1;
                }
            }
        }
        let positions = positions.unwrap_or_else(|| (0..seq as i64).collect());
        if positions.len() != seq {
            return Err(Error::interface("splice", format!("{} positions for {seq} tokens", positions.len())));
        }
        Ok(Prepared {
            input_ids,
            embeds,
            positions,
            key_bias: None,
            visual_tokens,
            visual_tokens_kept: rows,
            views: 0,
            layout: None,
        })
    }

    /// Gives the image rows of `prepared` their attention biases (`row_bias` in splice order).
    pub fn weigh_rows(&self, prepared: &mut Prepared, row_bias: &[f32]) -> Result<()> {
        let image_id = self.family.image_token_id();
        let mut rows = row_bias.iter();
        let bias: Vec<f32> = prepared
            .input_ids
            .iter()
            .map(|&t| if t == image_id { rows.next().copied().unwrap_or(0.0) } else { 0.0 })
            .collect();
        if rows.next().is_some() || prepared.visual_tokens_kept != row_bias.len() {
            return Err(Error::interface("splice", "attention biases do not match the image rows"));
        }
        prepared.key_bias = Some(bias);
        Ok(())
    }
}

/// Position ids of a pruned sequence in the unpruned one: every token keeps the position it had
/// before image tokens were dropped (gaps where they were).
pub fn original_positions(ids: &[i64], image_id: i64, input: &VisionInput, sel: &Selection) -> Result<Vec<i64>> {
    // For the j-th kept image token (view v, index i): the tokens dropped before it are all drops
    // of earlier views plus the drops of view v with a smaller index.
    let mut dropped_before_view = Vec::with_capacity(input.views.len());
    let mut acc = 0i64;
    for (view, kept) in input.views.iter().zip(&sel.kept) {
        dropped_before_view.push(acc);
        acc += (view.tokens - kept.len()) as i64;
    }
    let kept: Vec<(usize, usize, usize)> = sel
        .kept
        .iter()
        .enumerate()
        .flat_map(|(v, k)| k.iter().enumerate().map(move |(rank, &i)| (v, i, rank)))
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    let mut shift = 0i64;
    let mut next = 0usize;
    for (p, &t) in ids.iter().enumerate() {
        if t == image_id {
            let &(v, i, rank) =
                kept.get(next).ok_or_else(|| Error::interface("splice", "more image tokens than kept rows"))?;
            next += 1;
            shift = dropped_before_view[v] + (i - rank) as i64;
            out.push(p as i64 + shift);
            // After the last kept token of a view, the view's trailing drops also precede what follows.
            if kept.get(next).is_none_or(|&(nv, _, _)| nv != v) {
                shift = dropped_before_view[v] + (input.views[v].tokens - sel.kept[v].len()) as i64;
            }
        } else {
            out.push(p as i64 + shift);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::{View, ViewKind};

    fn view(n: usize) -> View {
        View { kind: ViewKind::Whole, tokens: n, grid: (1, n), region: [0.0, 0.0, 1.0, 1.0] }
    }

    #[test]
    fn original_positions_leave_gaps_where_tokens_were_dropped() {
        const I: i64 = 9;
        // Unpruned: [t0, I, I, I, I, t5, I, I, I, t42] with views of 4 and 3 tokens.
        let input = VisionInput { tensors: vec![], views: vec![view(4), view(3)], rows: 0, cols: 0, anyres: None };
        let sel = Selection { kept: vec![vec![1, 3], vec![0]], ..Default::default() };
        let ids = vec![0, I, I, 5, I, 42];
        let pos = original_positions(&ids, I, &input, &sel).unwrap();
        assert_eq!(pos, vec![0, 2, 4, 5, 6, 9]);
        // Keeping everything gives 0..n.
        let all = Selection::all(&input.views);
        let ids = vec![0, I, I, I, I, 5, I, I, I, 42];
        assert_eq!(original_positions(&ids, I, &input, &all).unwrap(), (0..10).collect::<Vec<i64>>());
    }
}
