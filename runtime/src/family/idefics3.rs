//! Idefics3 / SmolVLM: the image is resized so its longest edge is `size.longest_edge`, then up
//! to multiples of the encoder tile (`max_image_size.longest_edge`), cut into tiles, and a
//! downscaled global view is appended; each view becomes `image_seq_len` tokens after the
//! SigLIP encoder and pixel shuffle. Mirrors transformers' `Idefics3ImageProcessor` and
//! `Idefics3Processor`.

use image::RgbImage;
use ndarray::{Array4, Array5};

use super::{View, ViewKind, VisionInput};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::folder::{json_usize, ModelFolder};
use crate::preprocess::{self, Filter};
use crate::text::TextTokenizer;

/// transformers' `MAX_IMAGE_SIZE` for Idefics3: no side goes above it after the first resize.
const MAX_IMAGE_SIZE: usize = 4096;

/// The Idefics3 / SmolVLM family.
#[derive(Debug, Clone)]
pub struct Idefics3 {
    image_token_id: i64,
    do_resize: bool,
    longest_edge: usize,
    do_split: bool,
    tile: usize,
    filter: Filter,
    rescale: f64,
    mean: [f32; 3],
    std: [f32; 3],
    image_seq_len: usize,
    /// Patches per view entering the connector (`(tile / patch_size)²`), when config.json says.
    grid: Option<usize>,
}

impl Idefics3 {
    /// Reads the family's settings from the folder.
    pub fn new(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Self> {
        let pre = folder.preprocessor_file.clone();
        let tile = match crate::folder::lookup(&folder.preprocessor, "max_image_size.longest_edge") {
            Some(_) => super::side_setting(folder, &["max_image_size.longest_edge"])?,
            None => {
                let t = folder.config_usize(&["vision_config.image_size"])?;
                if t == 0 || t > super::MAX_SETTING_SIDE {
                    return Err(Error::field(
                        folder.path("config.json"),
                        "vision_config.image_size",
                        format!("{t} is not an image size in 1..={}", super::MAX_SETTING_SIDE),
                    ));
                }
                t
            }
        };
        let longest_edge = match crate::folder::lookup(&folder.preprocessor, "size.longest_edge") {
            Some(_) => super::side_setting(folder, &["size.longest_edge"])?,
            None => 4 * tile,
        };
        let image_seq_len =
            match json_usize(&folder.processor, &folder.path("processor_config.json"), &["image_seq_len"]) {
                Ok(n) => n,
                Err(_) => {
                    let size = folder.config_usize(&["vision_config.image_size"])?;
                    let patch = folder.config_usize(&["vision_config.patch_size"])?;
                    let scale = folder.config_usize(&["scale_factor"]).unwrap_or(1).max(1);
                    if patch == 0 || size % patch != 0 {
                        return Err(Error::field(
                            folder.path("config.json"),
                            "vision_config.patch_size",
                            "must divide image_size",
                        ));
                    }
                    (size / patch).pow(2) / (scale * scale)
                }
            };
        if tile == 0 || image_seq_len == 0 {
            return Err(Error::field(pre, "max_image_size.longest_edge", "must be positive"));
        }
        Ok(Idefics3 {
            image_token_id: super::image_token_id(folder, tokenizer, "<image>")?,
            do_resize: super::flag(folder, "do_resize", true),
            longest_edge,
            do_split: super::flag(folder, "do_image_splitting", true),
            tile,
            filter: super::filter(folder, Filter::Lanczos)?,
            rescale: super::rescale(folder),
            mean: super::triple(folder, "image_mean", [0.5; 3])?,
            std: super::std_triple(folder, [0.5; 3])?,
            image_seq_len,
            grid: folder
                .config_usize(&["vision_config.patch_size"])
                .ok()
                .filter(|&p| p > 0 && tile % p == 0)
                .map(|p| (tile / p).pow(2)),
        })
    }

    pub(crate) fn boxed(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Box<dyn super::Family>> {
        Ok(Box::new(Self::new(folder, tokenizer)?))
    }

    /// Tokens per view after pixel shuffle.
    pub fn image_seq_len(&self) -> usize {
        self.image_seq_len
    }
}

/// Size after scaling the longest edge to `max_len` (even other side), then capping at
/// [`MAX_IMAGE_SIZE`]; returns `(height, width)`.
fn resize_longest_edge(h: usize, w: usize, max_len: usize) -> (usize, usize) {
    let aspect = w as f64 / h as f64;
    let (mut h2, mut w2);
    if w >= h {
        w2 = max_len;
        h2 = (w2 as f64 / aspect) as usize;
        if h2 % 2 != 0 {
            h2 += 1;
        }
    } else {
        h2 = max_len;
        w2 = (h2 as f64 * aspect) as usize;
        if w2 % 2 != 0 {
            w2 += 1;
        }
    }
    h2 = h2.max(1);
    w2 = w2.max(1);
    // Scale below the upper bound.
    let aspect = w2 as f64 / h2 as f64;
    if w2 >= h2 && w2 > MAX_IMAGE_SIZE {
        w2 = MAX_IMAGE_SIZE;
        h2 = (w2 as f64 / aspect) as usize;
    } else if h2 > w2 && h2 > MAX_IMAGE_SIZE {
        h2 = MAX_IMAGE_SIZE;
        w2 = (h2 as f64 * aspect) as usize;
    }
    (h2.max(1), w2.max(1))
}

/// Size rounded up to multiples of the tile, keeping the aspect ratio as transformers does;
/// returns `(height, width)`.
fn resize_for_encoder(h: usize, w: usize, tile: usize) -> (usize, usize) {
    let aspect = w as f64 / h as f64;
    if w >= h {
        let w2 = w.div_ceil(tile) * tile;
        let h2 = (w2 as f64 / aspect) as usize;
        (h2.div_ceil(tile).max(1) * tile, w2)
    } else {
        let h2 = h.div_ceil(tile) * tile;
        let w2 = (h2 as f64 * aspect) as usize;
        (h2, w2.div_ceil(tile).max(1) * tile)
    }
}

impl super::Family for Idefics3 {
    fn name(&self) -> &'static str {
        "idefics3"
    }

    fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    fn image_placeholder(&self) -> &str {
        "<image>"
    }

    fn preprocess(&self, image: &RgbImage) -> Result<VisionInput> {
        let mut img = image.clone();
        if self.do_resize {
            let (h, w) = resize_longest_edge(img.height() as usize, img.width() as usize, self.longest_edge);
            img = preprocess::resize(&img, w as u32, h as u32, self.filter);
        }
        let t = self.tile as u32;
        let mut frames: Vec<RgbImage> = Vec::new();
        let mut views = Vec::new();
        let grid_side = (self.image_seq_len as f64).sqrt().round() as usize;
        let grid =
            if grid_side * grid_side == self.image_seq_len { (grid_side, grid_side) } else { (1, self.image_seq_len) };
        let (mut rows, mut cols) = (0, 0);
        if self.do_split {
            let (h, w) = resize_for_encoder(img.height() as usize, img.width() as usize, self.tile);
            img = preprocess::resize(&img, w as u32, h as u32, self.filter);
            let (h, w) = (img.height(), img.width());
            if h > t || w > t {
                rows = h.div_ceil(t) as usize;
                cols = w.div_ceil(t) as usize;
                let oh = h.div_ceil(rows as u32);
                let ow = w.div_ceil(cols as u32);
                for r in 0..rows as u32 {
                    for c in 0..cols as u32 {
                        let (x0, y0) = (c * ow, r * oh);
                        let (x1, y1) = ((x0 + ow).min(w), (y0 + oh).min(h));
                        frames.push(preprocess::crop(&img, x0, y0, x1, y1));
                        views.push(View {
                            kind: ViewKind::Tile { row: r as usize, col: c as usize },
                            tokens: self.image_seq_len,
                            grid,
                            region: [
                                x0 as f32 / w as f32,
                                y0 as f32 / h as f32,
                                x1 as f32 / w as f32,
                                y1 as f32 / h as f32,
                            ],
                        });
                    }
                }
                if (h, w) != (t, t) {
                    img = preprocess::resize(&img, t, t, self.filter);
                }
            }
        } else {
            img = preprocess::resize(&img, t, t, self.filter);
        }
        frames.push(img);
        views.push(View { kind: ViewKind::Global, tokens: self.image_seq_len, grid, region: [0.0, 0.0, 1.0, 1.0] });

        // Pad every frame to the largest frame (top-left aligned) with a validity mask.
        let ph = frames.iter().map(|f| f.height()).max().unwrap_or(t) as usize;
        let pw = frames.iter().map(|f| f.width()).max().unwrap_or(t) as usize;
        let n = frames.len();
        let mut pixels = Array5::<f32>::zeros((1, n, 3, ph, pw));
        let mut mask = Array4::<bool>::from_elem((1, n, ph, pw), false);
        for (i, f) in frames.iter().enumerate() {
            let (fh, fw) = (f.height() as usize, f.width() as usize);
            let mut dst = pixels.slice_mut(ndarray::s![0, i, .., ..fh, ..fw]);
            preprocess::normalize_into(f, self.rescale, &self.mean, &self.std, dst.view_mut());
            mask.slice_mut(ndarray::s![0, i, ..fh, ..fw]).fill(true);
        }
        Ok(VisionInput {
            tensors: vec![
                ("pixel_values".into(), Tensor::F32(pixels.into_dyn())),
                ("pixel_attention_mask".into(), Tensor::Bool(mask.into_dyn())),
            ],
            views,
            rows,
            cols,
            anyres: None,
        })
    }

    fn splits_into_tiles(&self) -> bool {
        self.do_split
    }

    fn encoder_hints(&self) -> crate::backend::LoadHints {
        let t = self.tile;
        crate::backend::LoadHints::default()
            .dim("pixel_values", 0, 1)
            .dim("pixel_values", 3, t)
            .dim("pixel_values", 4, t)
            .dim("pixel_attention_mask", 0, 1)
            .dim("pixel_attention_mask", 2, t)
            .dim("pixel_attention_mask", 3, t)
    }

    fn views_axis(&self) -> usize {
        1
    }

    fn head_hints(&self) -> crate::backend::LoadHints {
        // the connector's pixel shuffle reshapes by the grid side, which tract must know
        match self.grid {
            Some(n) => crate::backend::LoadHints::default().dim("hidden_states", 1, n),
            None => crate::backend::LoadHints::default(),
        }
    }

    fn planned_tokens(&self, width: u32, height: u32) -> Option<usize> {
        let (mut h, mut w) = (height as usize, width as usize);
        if self.do_resize {
            (h, w) = resize_longest_edge(h, w, self.longest_edge);
        }
        let mut views = 1;
        if self.do_split {
            let (h, w) = resize_for_encoder(h, w, self.tile);
            if h > self.tile || w > self.tile {
                views += h.div_ceil(self.tile) * w.div_ceil(self.tile);
            }
        }
        Some(views * self.image_seq_len)
    }

    fn expand_image(&self, input: &VisionInput, kept: &[usize]) -> String {
        const FAKE: &str = "<fake_token_around_image>";
        let mut s = String::new();
        let mut last_row = None;
        for (view, &k) in input.views.iter().zip(kept) {
            match view.kind {
                ViewKind::Tile { row, col } => {
                    if last_row.is_some_and(|r| r != row) {
                        s.push('\n');
                    }
                    last_row = Some(row);
                    s.push_str(&format!("{FAKE}<row_{}_col_{}>", row + 1, col + 1));
                    s.push_str(&"<image>".repeat(k));
                }
                ViewKind::Global | ViewKind::Whole | ViewKind::Grid => {
                    if last_row.is_some() {
                        s.push_str("\n\n");
                    }
                    s.push_str(&format!("{FAKE}<global-img>"));
                    s.push_str(&"<image>".repeat(k));
                    s.push_str(FAKE);
                }
            }
        }
        s
    }

    fn fallback_prompt(&self, prompt: &str, with_image: bool) -> String {
        let image = if with_image { "<image>" } else { "" };
        format!("<|im_start|>User:{image}{prompt}<end_of_utterance>\nAssistant:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_edge_resize_matches_transformers_rule() {
        // width >= height: width becomes max_len, height rounds up to even.
        assert_eq!(resize_longest_edge(40, 48, 192), (160, 192));
        assert_eq!(resize_longest_edge(90, 200, 192), (86, 192));
        assert_eq!(resize_longest_edge(200, 90, 192), (192, 86));
        assert_eq!(resize_longest_edge(10, 10000, 8192), (4, 4096));
    }

    #[test]
    fn encoder_resize_rounds_to_tiles() {
        assert_eq!(resize_for_encoder(86, 192, 64), (128, 192));
        assert_eq!(resize_for_encoder(192, 86, 64), (192, 128));
        assert_eq!(resize_for_encoder(64, 64, 64), (64, 64));
    }
}
