//! Tokenizer and chat template: `tokenizer.json` through the `tokenizers` crate and the
//! Jinja chat template that transformers would apply, rendered with minijinja.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::folder::ModelFolder;

/// Reads a `tokenizer.json` with the `tokenizers` crate; unreadable or invalid files, and any
/// panic left in the crate, become errors naming the file.
pub fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    // invalid JSON is refused here: the tokenizers crate panics on some of it (an `unwrap` in
    // its decoder deserializer, found by fuzzing: fuzz/regressions/tokenizer)
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    // and a panic left in it becomes an error naming the file
    let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes)).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("the tokenizers crate panicked reading it: {why}"),
        }
    })?;
    parsed.map_err(|e| Error::Tokenizer { path: path.to_path_buf(), message: e.to_string() })
}

/// The model's tokenizer plus its chat template.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    template: Option<(String, PathBuf)>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("path", &self.path).finish_non_exhaustive()
    }
}

fn special_token(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and finds the chat template (`chat_template.jinja`,
    /// `chat_template.json` or `tokenizer_config.json`'s `chat_template`, in that order).
    pub fn load(folder: &ModelFolder) -> Result<Self> {
        let path = folder.path("tokenizer.json");
        let tokenizer = read_tokenizer(&path)?;
        let template = find_template(folder)?;
        Ok(TextTokenizer {
            tokenizer,
            path,
            template,
            bos_token: special_token(folder.tokenizer_config.get("bos_token")),
            eos_token: special_token(folder.tokenizer_config.get("eos_token")),
        })
    }

    /// Whether the folder ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a single user turn (optionally with one image) and the generation prompt, as
    /// `processor.apply_chat_template(messages, add_generation_prompt=True)` does.
    pub fn render_chat(&self, prompt: &str, with_image: bool) -> Result<Option<String>> {
        self.render_chat_turns(&[], prompt, with_image)
    }

    /// Renders earlier text turns, then the user turn (optionally with one image) and the
    /// generation prompt; every turn's content is a list of typed parts, as processors pass it.
    pub fn render_chat_turns(
        &self,
        history: &[crate::pipeline::Turn],
        prompt: &str,
        with_image: bool,
    ) -> Result<Option<String>> {
        let Some((source, path)) = &self.template else { return Ok(None) };
        let mut content = Vec::new();
        if with_image {
            content.push(json!({"type": "image"}));
        }
        content.push(json!({"type": "text", "text": prompt}));
        let mut messages: Vec<Value> = history
            .iter()
            .map(|t| json!({"role": t.role.name(), "content": [{"type": "text", "text": t.text}]}))
            .collect();
        messages.push(json!({"role": "user", "content": content}));
        let messages = Value::Array(messages);
        let terr = |e: minijinja::Error| Error::Template { path: path.clone(), message: format!("{e:#}") };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", source).map_err(terr)?;
        let tmpl = env.get_template("chat").map_err(terr)?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(&messages),
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        tmpl.render(ctx).map(Some).map_err(terr)
    }

    /// Encodes text with the tokenizer's special-token handling (as transformers' default).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Encodes text without special tokens (the instruction alone, for text signals).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(i64::from)
    }

    /// The path of `tokenizer.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn find_template(folder: &ModelFolder) -> Result<Option<(String, PathBuf)>> {
    let jinja = folder.path("chat_template.jinja");
    if jinja.is_file() {
        let s = std::fs::read_to_string(&jinja).map_err(|source| Error::Io { path: jinja.clone(), source })?;
        return Ok(Some((s, jinja)));
    }
    let json_path = folder.path("chat_template.json");
    if json_path.is_file() {
        let bytes = std::fs::read(&json_path).map_err(|source| Error::Io { path: json_path.clone(), source })?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: json_path.clone(), source })?;
        if let Some(s) = template_string(v.get("chat_template")) {
            return Ok(Some((s, json_path)));
        }
    }
    Ok(template_string(folder.tokenizer_config.get("chat_template")).map(|s| (s, folder.path("tokenizer_config.json"))))
}

fn template_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}
