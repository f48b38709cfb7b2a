//! `glimpse.json`, the model manifest: which ONNX parts a folder has and what each is for, the
//! pruning signals its vision part exports, and facts about the export. Written by one writer
//! (`tools/export/glimpse_export/manifest.py`), read here. Folders without one — downloaded
//! onnx-community models — get the default three parts and no signals.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::folder::Part;

/// The newest manifest version this build reads.
pub const MANIFEST_VERSION: u32 = 1;

/// One ONNX part: its role in the pipeline and its file stem under `onnx/` (dtype variants add
/// their suffix, `decoder_model_merged_q4.onnx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    pub role: Part,
    pub stem: String,
}

/// The parsed manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (absent in manifests written before versioning: read as 1).
    #[serde(default = "one")]
    pub manifest_version: u32,
    /// What kind of model folder this is (`vlm`).
    #[serde(default = "vlm")]
    pub kind: String,
    /// The parts, in pipeline order.
    #[serde(default = "default_parts")]
    pub parts: Vec<PartEntry>,
    /// The staged vision encoder, when the folder has one (`docs/stages.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Stages>,
    /// Signal name → vision-encoder output that carries it.
    #[serde(default)]
    pub signals: BTreeMap<String, String>,
    /// Export facts (`realsize`, seed, architecture, ...), free-form.
    #[serde(default)]
    pub export: serde_json::Map<String, serde_json::Value>,
}

/// The vision encoder as stages: `embed` (pixels → the residual stream entering layer 0),
/// groups of encoder layers whose token axis is dynamic, and `head` (the full grid → the
/// monolithic encoder's outputs). Stems carry no dtype suffix; variants add the parts' suffix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stages {
    pub embed: String,
    pub blocks: Vec<BlockGroup>,
    pub head: String,
    /// What wrote them: `export` (tools/export, from the torch modules) or `split` (`glimpse split`,
    /// by graph surgery on the monolithic file).
    #[serde(default)]
    pub made_by: String,
}

/// One `vision_blocks_K` file: its stem and the encoder layers `[first, end)` it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockGroup {
    pub stem: String,
    pub layers: [usize; 2],
}

impl Stages {
    /// Every stem in run order: embed, the groups, head.
    pub fn stems(&self) -> Vec<&str> {
        let mut v = vec![self.embed.as_str()];
        v.extend(self.blocks.iter().map(|b| b.stem.as_str()));
        v.push(self.head.as_str());
        v
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.blocks.is_empty() {
            return Err(Error::field(path, "stages.blocks", "lists no group of layers"));
        }
        let mut next = self.blocks[0].layers[0];
        for (i, b) in self.blocks.iter().enumerate() {
            let [a, e] = b.layers;
            if a != next || e <= a {
                return Err(Error::field(
                    path,
                    format!("stages.blocks[{i}].layers"),
                    format!("[{a}, {e}] must be a non-empty range starting where the previous group ended ({next})"),
                ));
            }
            next = e;
        }
        for stem in self.stems() {
            if !plain_stem(stem) {
                return Err(Error::field(path, "stages", format!("stem `{stem}` must be a plain file stem")));
            }
        }
        let stems = self.stems();
        if let Some(dup) = stems.iter().enumerate().find_map(|(i, s)| stems[..i].contains(s).then_some(s)) {
            return Err(Error::field(path, "stages", format!("stem `{dup}` listed twice")));
        }
        Ok(())
    }
}

fn plain_stem(stem: &str) -> bool {
    !stem.is_empty() && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn one() -> u32 {
    1
}

fn vlm() -> String {
    "vlm".into()
}

/// The onnx-community split: vision encoder, token embeddings, merged decoder.
pub fn default_parts() -> Vec<PartEntry> {
    Part::ALL.iter().map(|&role| PartEntry { role, stem: role.stem().to_string() }).collect()
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            manifest_version: 1,
            kind: vlm(),
            parts: default_parts(),
            stages: None,
            signals: BTreeMap::new(),
            export: Default::default(),
        }
    }
}

impl Manifest {
    /// Reads `glimpse.json` from a folder, or the default manifest when there is none.
    pub fn load(root: &Path) -> Result<Manifest> {
        let path = root.join("glimpse.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.clone(), source })?;
        m.validate(&path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.manifest_version > MANIFEST_VERSION {
            return Err(Error::field(
                path,
                "manifest_version",
                format!("{} is newer than this build reads ({MANIFEST_VERSION})", self.manifest_version),
            ));
        }
        if self.kind != "vlm" {
            return Err(Error::field(path, "kind", format!("`{}`: this build loads `vlm` folders", self.kind)));
        }
        for role in Part::ALL {
            if !self.parts.iter().any(|p| p.role == role) {
                return Err(Error::field(path, "parts", format!("no part with role `{}`", role.role())));
            }
        }
        for (i, p) in self.parts.iter().enumerate() {
            if self.parts[..i].iter().any(|q| q.role == p.role) {
                return Err(Error::field(path, "parts", format!("role `{}` listed twice", p.role.role())));
            }
            if !plain_stem(&p.stem) {
                return Err(Error::field(path, "parts", format!("stem `{}` must be a plain file stem", p.stem)));
            }
        }
        if let Some(stages) = &self.stages {
            stages.validate(path)?;
        }
        Ok(())
    }

    /// Writes the manifest back as `glimpse.json` (the format of
    /// `tools/export/glimpse_export/manifest.py`, its other writer): used by `glimpse split`.
    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join("glimpse.json");
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| Error::Json { path: path.clone(), source })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    }

    /// The file stem of a part.
    pub fn stem(&self, part: Part) -> &str {
        self.parts.iter().find(|p| p.role == part).map_or(part.stem(), |p| p.stem.as_str())
    }

    /// Whether the export tools marked this a real-size (random-weight, timing-only) model.
    pub fn is_realsize(&self) -> bool {
        self.export.get("realsize").and_then(serde_json::Value::as_bool).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Manifest> {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("glimpse.json"), s).unwrap();
        Manifest::load(tmp.path())
    }

    #[test]
    fn absent_and_legacy_manifests_get_the_default_parts() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load(tmp.path()).unwrap(), Manifest::default());
        let m = parse(r#"{"signals": {"keys": "glimpse_keys"}}"#).unwrap();
        assert_eq!(m.parts, default_parts());
        assert_eq!(m.signals["keys"], "glimpse_keys");
        assert_eq!(m.stem(Part::Decoder), "decoder_model_merged");
    }

    #[test]
    fn parts_and_export_are_read() {
        let m = parse(
            r#"{"manifest_version": 1, "kind": "vlm", "parts": [
                {"role": "vision_encoder", "stem": "vision_encoder"},
                {"role": "embed_tokens", "stem": "embed_tokens"},
                {"role": "decoder", "stem": "decoder_model"}], "export": {"realsize": true}}"#,
        )
        .unwrap();
        assert_eq!(m.stem(Part::Decoder), "decoder_model");
        assert!(m.is_realsize());
    }

    #[test]
    fn stages_are_read_and_checked() {
        let stages = r#""stages": {"embed": "vision_embed", "blocks": [{"stem": "vision_blocks_0", "layers": [0, 1]},
            {"stem": "vision_blocks_1", "layers": [1, 2]}], "head": "vision_head", "made_by": "export"}"#;
        let m = parse(&format!("{{{stages}}}")).unwrap();
        let s = m.stages.as_ref().unwrap();
        assert_eq!(s.stems(), ["vision_embed", "vision_blocks_0", "vision_blocks_1", "vision_head"]);
        let tmp = tempfile::tempdir().unwrap();
        m.save(tmp.path()).unwrap();
        assert_eq!(Manifest::load(tmp.path()).unwrap(), m);
        for (bad, field) in [
            (stages.replace("[1, 2]", "[2, 3]"), "stages.blocks[1].layers"),
            (stages.replace("[0, 1]", "[0, 0]"), "stages.blocks[0].layers"),
            (stages.replace("vision_head", "../head"), "../head"),
            (stages.replace("vision_head", "vision_embed"), "listed twice"),
            (stages.replace("\"made_by\"", "\"made\""), "made"),
        ] {
            let e = parse(&format!("{{{bad}}}")).unwrap_err().to_string();
            assert!(e.contains("glimpse.json") && e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_manifests_name_the_field() {
        for (text, field) in [
            (r#"{"manifest_version": 9}"#, "manifest_version"),
            (r#"{"kind": "audio"}"#, "kind"),
            (r#"{"parts": [{"role": "decoder", "stem": "d"}]}"#, "parts"),
            (
                r#"{"parts": [{"role": "vision_encoder", "stem": "../x"}, {"role": "embed_tokens", "stem": "e"}, {"role": "decoder", "stem": "d"}]}"#,
                "parts",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("glimpse.json") && e.contains(field), "{text}: {e}");
        }
        let e = parse(r#"{"parts": [{"role": "tokenizer", "stem": "t"}]}"#).unwrap_err().to_string();
        assert!(e.contains("glimpse.json") && e.contains("tokenizer"), "{e}");
    }
}
