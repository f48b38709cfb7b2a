//! Work counted from the model's `config.json`, not guessed: floating-point operations of the
//! vision encoder per view and of the language model's prefill, and the bytes a decode step
//! must read. Profiling divides these by measured times to report efficiency.

use serde::Serialize;

use crate::error::Result;
use crate::folder::ModelFolder;

/// Shape of the language model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TextShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// Shape of the vision tower and connector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VisionShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub image_size: usize,
    pub patch: usize,
    /// Whether the tower prepends a CLS token (CLIP).
    pub cls: bool,
    /// Pixel-shuffle factor of an Idefics3 connector (1 = none).
    pub scale_factor: usize,
    /// Width of the LLM the connector projects into.
    pub out_hidden: usize,
    /// Connector is a two-layer MLP (LLaVA, LLaVA-OneVision) rather than one linear layer (Idefics3).
    pub mlp_connector: bool,
}

fn u(folder: &ModelFolder, paths: &[&str]) -> Result<usize> {
    folder.config_usize(paths)
}

impl TextShape {
    /// Reads the text sub-config.
    pub fn from_folder(folder: &ModelFolder) -> Result<Self> {
        let hidden = u(folder, &["text_config.hidden_size", "hidden_size"])?;
        let heads = u(folder, &["text_config.num_attention_heads", "num_attention_heads"])?;
        Ok(TextShape {
            hidden,
            intermediate: u(folder, &["text_config.intermediate_size", "intermediate_size"])?,
            layers: u(folder, &["text_config.num_hidden_layers", "num_hidden_layers"])?,
            heads,
            kv_heads: u(folder, &["text_config.num_key_value_heads", "num_key_value_heads"]).unwrap_or(heads),
            head_dim: u(folder, &["text_config.head_dim", "head_dim"]).unwrap_or(hidden / heads.max(1)),
            vocab: u(folder, &["text_config.vocab_size", "vocab_size"])?,
        })
    }

    /// FLOPs (2 per multiply-add) of a prefill over `seq` new tokens after `past` cached ones,
    /// counting attention over the full key length and logits for every position, as the
    /// exported decoder computes them.
    pub fn prefill_flops(&self, seq: usize, past: usize) -> f64 {
        let (s, h, i) = (seq as f64, self.hidden as f64, self.intermediate as f64);
        let q = (self.heads * self.head_dim) as f64;
        let kv = (self.kv_heads * self.head_dim) as f64;
        let keys = (seq + past) as f64;
        let proj = 2.0 * s * h * (q + 2.0 * kv) + 2.0 * s * q * h;
        let mlp = 2.0 * 3.0 * s * h * i;
        let attn = 2.0 * 2.0 * s * keys * q;
        self.layers as f64 * (proj + mlp + attn) + 2.0 * s * h * self.vocab as f64
    }

    /// Bytes of KV cache read by one decode step at context length `ctx`.
    pub fn kv_bytes(&self, ctx: usize, bytes_per_value: usize) -> f64 {
        (2 * self.layers * self.kv_heads * self.head_dim * ctx * bytes_per_value) as f64
    }
}

impl VisionShape {
    /// Reads the vision sub-config for a family.
    pub fn from_folder(folder: &ModelFolder, family: &str) -> Result<Self> {
        let text_hidden = u(folder, &["text_config.hidden_size", "hidden_size"])?;
        Ok(VisionShape {
            hidden: u(folder, &["vision_config.hidden_size"])?,
            intermediate: u(folder, &["vision_config.intermediate_size"])?,
            layers: u(folder, &["vision_config.num_hidden_layers"])?,
            image_size: u(folder, &["vision_config.image_size"])?,
            patch: u(folder, &["vision_config.patch_size"])?,
            cls: family == "llava",
            scale_factor: if family == "idefics3" { u(folder, &["scale_factor"]).unwrap_or(1) } else { 1 },
            out_hidden: text_hidden,
            mlp_connector: matches!(family, "llava" | "llava_onevision"),
        })
    }

    /// FLOPs to encode one view (tower + connector).
    pub fn flops_per_view(&self) -> f64 {
        let patches = (self.image_size / self.patch.max(1)).pow(2);
        let n = (patches + usize::from(self.cls)) as f64;
        let (d, i) = (self.hidden as f64, self.intermediate as f64);
        let embed = 2.0 * patches as f64 * (3 * self.patch * self.patch) as f64 * d;
        let layer = 2.0 * 4.0 * n * d * d + 2.0 * 2.0 * n * n * d + 2.0 * 2.0 * n * d * i;
        let out = self.out_hidden as f64;
        let connector = if self.mlp_connector {
            2.0 * patches as f64 * (d * out + out * out)
        } else {
            let s2 = (self.scale_factor * self.scale_factor) as f64;
            2.0 * (patches as f64 / s2) * (d * s2) * out
        };
        embed + self.layers as f64 * layer + connector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_flops_are_about_twice_the_parameters_per_token() {
        // SmolVLM-256M's text model: ~135M parameters (incl. a 49280 x 576 lm_head).
        let t = TextShape {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49280,
        };
        let params = 30.0 * (576.0 * (576.0 + 2.0 * 192.0) + 576.0 * 576.0 + 3.0 * 576.0 * 1536.0) + 576.0 * 49280.0;
        let per_token = t.prefill_flops(1, 0);
        assert!((per_token / (2.0 * params) - 1.0).abs() < 0.01, "{per_token} vs {params}");
        // Attention grows with the context.
        assert!(t.prefill_flops(1, 1000) > per_token);
    }

    #[test]
    fn siglip_b16_at_512_is_about_200_gflop_per_tile() {
        let v = VisionShape {
            hidden: 768,
            intermediate: 3072,
            layers: 12,
            image_size: 512,
            patch: 16,
            cls: false,
            scale_factor: 4,
            out_hidden: 576,
            mlp_connector: false,
        };
        let g = v.flops_per_view() / 1e9;
        assert!((180.0..240.0).contains(&g), "{g} GFLOP");
    }
}
