//! `glimpse split`: turns a monolithic `vision_encoder*.onnx` into the staged form of
//! `docs/stages.md` (`vision_embed`, `vision_blocks_K`, `vision_head`) by ONNX graph surgery,
//! and verifies before writing that the chained stages equal the monolithic encoder.
//!
//! Parsing and surgery are apart: [`Analysis`] reads the graph — which nodes belong to which
//! encoder layer (by the `layers.N/` scope the exporters put in node names), the residual-stream
//! tensor entering each layer, and the attention mask the layers add to their logits — and
//! [`Analysis::stage`] cuts one stage out of it as a backward slice. A cut fails with the node
//! and the reason when the graph does not have that shape.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::{s, Array2, ArrayD};
use prost::Message;
use serde::Serialize;
use tract_onnx::pb;

use crate::backend::{self, Backend, BackendOptions, LoadHints, NamedOutputs, Session, Tensor};
use crate::error::{Error, Result};
use crate::family;
use crate::folder::{Dtype, ModelFolder, Part};
use crate::manifest::{BlockGroup, Stages};
use crate::pipeline::vision::as_declared;
use crate::text::TextTokenizer;

/// What to split and how.
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// Number of equal groups of layers (earlier groups take the remainder); ignored when `at`
    /// is given.
    pub groups: usize,
    /// Layer indices where a new group starts (`--at 4,8`).
    pub at: Vec<usize>,
    /// Which variant of the monolithic encoder to split; the stages get its suffix.
    pub dtype: Dtype,
    /// Backends that verify the cut (each that can start is used; tract always can).
    pub backends: Vec<String>,
    pub backend_options: BackendOptions,
    /// Replace stages already listed with other layer groups.
    pub force: bool,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            groups: 2,
            at: Vec::new(),
            dtype: Dtype::Fp32,
            backends: vec!["tract".into(), "ort".into()],
            backend_options: BackendOptions::default(),
            force: false,
        }
    }
}

/// What `split` did.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    /// The monolithic file split.
    pub source: PathBuf,
    /// Encoder layers found.
    pub layers: usize,
    /// The groups written, `[first, end)`.
    pub groups: Vec<[usize; 2]>,
    /// The files written, in run order.
    pub files: Vec<StageFile>,
    /// The attention mask the layers read, replaced by each group's `attention_bias` input
    /// (`None`: the bias is added before each layer's Softmax).
    pub mask: Option<String>,
    /// Whether the groups output `keys` (no `k_proj` node found: they do not).
    pub keys: bool,
    /// Verification per backend.
    pub verified: Vec<Verified>,
    /// Backends asked for that could not start, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// One stage file written.
#[derive(Debug, Clone, Serialize)]
pub struct StageFile {
    pub stem: String,
    pub bytes: u64,
    pub nodes: usize,
}

/// The check on one backend: chained stages against the monolithic encoder.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub backend: String,
    /// Largest absolute difference over every output.
    pub max_abs_diff: f32,
    /// The tolerance it had to meet.
    pub tolerance: f32,
    /// Tokens each group ran on in the fewer-tokens check (of `grid`).
    pub fewer_tokens: usize,
    pub grid: usize,
}

/// Names the stage files use for the stream between stages (`docs/stages.md`).
pub const HIDDEN_IN: &str = "hidden_states";
/// A group's residual-stream output.
pub const HIDDEN_OUT: &str = "hidden_states_out";
/// A group's additive attention bias input `[views, tokens]`.
pub const BIAS: &str = "attention_bias";
/// A group's last-layer keys averaged over heads `[views, tokens, head_dim]`.
pub const KEYS: &str = "keys";

/// Splits the folder's monolithic vision encoder, verifies, and writes the stages and the
/// manifest's `stages`.
pub fn split(dir: &Path, opts: &SplitOptions) -> Result<SplitReport> {
    let folder = ModelFolder::open(dir)?;
    let source = folder.part_path(Part::VisionEncoder, opts.dtype)?;
    let mut proto = crate::onnx_info::read_proto(&source, &folder.root)?;
    inline_external_data(&mut proto, &source, &folder.root)?;
    let heads = folder.config_usize(&["vision_config.num_attention_heads"]).ok();
    let hidden = folder.config_usize(&["vision_config.hidden_size"])?;
    let analysis = Analysis::new(&proto, &node_scopes(&source, &folder.root)?, &source)?;
    let groups = plan_groups(analysis.layers, opts, &source)?;
    if let (Some(old), false) = (&folder.manifest.stages, opts.force) {
        let old_groups: Vec<[usize; 2]> = old.blocks.iter().map(|b| b.layers).collect();
        if old_groups != groups {
            return Err(Error::field(
                folder.path("glimpse.json"),
                "stages",
                format!(
                    "already lists groups {old_groups:?}, not {groups:?}; pass --force to replace them (other dtype variants' stage files then no longer match)"
                ),
            ));
        }
    }
    let suffix = opts.dtype.suffix();
    let mut stems = vec![format!("vision_embed{suffix}")];
    stems.extend((0..groups.len()).map(|k| format!("vision_blocks_{k}{suffix}")));
    stems.push(format!("vision_head{suffix}"));

    let mut models = vec![analysis.embed(&proto, hidden)?];
    for &[a, b] in &groups {
        models.push(analysis.group(&proto, a, b, hidden, heads)?);
    }
    models.push(analysis.head(&proto, hidden)?);

    // write into a scratch folder, verify, then move into onnx/
    let onnx_dir = folder.root.join("onnx");
    let scratch = onnx_dir.join(format!(".glimpse-split-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| Error::Io { path: scratch.clone(), source })?;
    let result = (|| {
        let mut files = Vec::new();
        for (stem, model) in stems.iter().zip(&models) {
            let bytes = model.encode_to_vec();
            if bytes.len() as u64 >= (2u64 << 30) - 1 {
                return Err(Error::OnnxLoad {
                    path: source.clone(),
                    backend: "split".into(),
                    message: format!("stage {stem} is {} bytes, over protobuf's 2 GiB limit", bytes.len()),
                });
            }
            let path = scratch.join(format!("{stem}.onnx"));
            std::fs::write(&path, &bytes).map_err(|source| Error::Io { path: path.clone(), source })?;
            let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
            files.push(StageFile { stem: stem.clone(), bytes: bytes.len() as u64, nodes });
        }
        let (verified, skipped) = verify(&folder, &source, &scratch, &stems, opts)?;
        for stem in &stems {
            let (from, to) = (scratch.join(format!("{stem}.onnx")), onnx_dir.join(format!("{stem}.onnx")));
            std::fs::rename(&from, &to).map_err(|source| Error::Io { path: to.clone(), source })?;
        }
        Ok((files, verified, skipped))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let (files, verified, skipped) = result?;
    let mut manifest = folder.manifest.clone();
    manifest.stages = Some(Stages {
        embed: "vision_embed".into(),
        blocks: groups
            .iter()
            .enumerate()
            .map(|(k, &layers)| BlockGroup { stem: format!("vision_blocks_{k}"), layers })
            .collect(),
        head: "vision_head".into(),
        made_by: "split".into(),
    });
    manifest.save(&folder.root)?;
    Ok(SplitReport {
        source,
        layers: analysis.layers,
        groups,
        files,
        mask: analysis.mask.clone(),
        keys: heads.is_some() && analysis.keys.iter().all(Option::is_some),
        verified,
        skipped,
    })
}

/// `[first, end)` per group from `--groups N` or `--at L1,L2`.
fn plan_groups(layers: usize, opts: &SplitOptions, source: &Path) -> Result<Vec<[usize; 2]>> {
    let bounds: Vec<usize> = if opts.at.is_empty() {
        let n = opts.groups;
        if n == 0 || n > layers {
            return Err(Error::invalid(
                "--groups",
                n,
                format!("must be 1..={layers} (the encoder has {layers} layers)"),
            ));
        }
        let (q, r) = (layers / n, layers % n);
        let mut v = vec![0];
        for k in 0..n {
            v.push(v[k] + q + usize::from(k < r));
        }
        v
    } else {
        let mut v = vec![0];
        for &l in &opts.at {
            if l == 0 || l >= layers || l <= *v.last().unwrap_or(&0) {
                return Err(Error::invalid(
                    "--at",
                    l,
                    format!(
                        "cut points must increase within 1..{layers} ({} has {layers} encoder layers)",
                        source.display()
                    ),
                ));
            }
            v.push(l);
        }
        v.push(layers);
        v
    };
    Ok(bounds.windows(2).map(|w| [w[0], w[1]]).collect())
}

/// Reads every external-data initializer's bytes into the proto (stages are self-contained).
fn inline_external_data(proto: &mut pb::ModelProto, onnx_file: &Path, root: &Path) -> Result<()> {
    let Some(g) = proto.graph.as_mut() else { return Ok(()) };
    for t in &mut g.initializer {
        let Some(loc) = t.external_data.iter().find(|kv| kv.key == "location").map(|kv| kv.value.clone()) else {
            continue;
        };
        let file = crate::folder::check_external_location(onnx_file, &loc, root)?;
        let num = |k: &str| t.external_data.iter().find(|kv| kv.key == k).and_then(|kv| kv.value.parse::<u64>().ok());
        let offset = num("offset").unwrap_or(0);
        let len = std::fs::metadata(&file).map_err(|source| Error::Io { path: file.clone(), source })?.len();
        let length = num("length").unwrap_or(len.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > len) {
            return Err(Error::OnnxLoad {
                path: onnx_file.to_path_buf(),
                backend: "split".into(),
                message: format!(
                    "initializer `{}` reads bytes {offset}..{} of {loc}, which has {len}",
                    t.name,
                    offset.saturating_add(length)
                ),
            });
        }
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&file).map_err(|source| Error::Io { path: file.clone(), source })?;
        let mut buf = vec![0u8; length as usize];
        f.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|source| Error::Io { path: file.clone(), source })?;
        t.raw_data = buf;
        t.external_data.clear();
        t.data_location = None;
    }
    Ok(())
}

/// Per node of the file, the scope names to read a layer index from: the node name, then the
/// dynamo exporter's module scopes.
fn node_scopes(path: &Path, root: &Path) -> Result<Vec<String>> {
    let m = crate::onnx_info::read_header(path, root)?;
    Ok(m.graph
        .map(|g| {
            g.node
                .into_iter()
                .map(|n| {
                    let mut scope = n.name;
                    for kv in n.metadata_props {
                        if kv.key == "pkg.torch.onnx.name_scopes" || kv.key == "namespace" {
                            scope.push(' ');
                            scope.push_str(&kv.value);
                        }
                    }
                    scope
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The layer index a node's name scopes it to (`/vision_model/encoder/layers.3/mlp/fc1/MatMul`
/// → 3; also `layer.3`, `blocks.3`).
fn layer_index(name: &str) -> Option<usize> {
    for key in ["layers.", "layer.", "blocks."] {
        let mut from = 0;
        while let Some(p) = name[from..].find(key) {
            let start = from + p;
            let before_ok = start == 0 || matches!(name.as_bytes()[start - 1], b'/' | b'.' | b'\'' | b' ');
            let digits: String = name[start + key.len()..].chars().take_while(char::is_ascii_digit).collect();
            let after = name.as_bytes().get(start + key.len() + digits.len()).copied();
            if before_ok && !digits.is_empty() && matches!(after, None | Some(b'/' | b'.' | b'\'' | b':' | b' ' | b','))
            {
                return digits.parse().ok();
            }
            from = start + key.len();
        }
    }
    None
}

/// The graph as the cut sees it.
struct Analysis {
    source: PathBuf,
    /// Encoder layers found (`0..layers`).
    layers: usize,
    /// Per node: its layer, when scoped to one.
    layer_of: Vec<Option<usize>>,
    /// Tensor → index of the node producing it.
    producer: HashMap<String, usize>,
    /// Tensors computed from initializers and constants only (duplicated into any stage).
    constant: HashSet<String>,
    /// The residual stream entering layer i (`residual[layers]` leaves the last layer).
    residual: Vec<String>,
    /// The attention mask the layers add to their logits, computed before layer 0.
    mask: Option<String>,
    /// Per layer: the tensor out of its key projection.
    keys: Vec<Option<String>>,
    /// The model's float type (of its first output).
    float: i32,
    /// Graph inputs by name.
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    opset: i64,
}

fn cut_error(source: &Path, message: impl Into<String>) -> Error {
    Error::OnnxLoad { path: source.to_path_buf(), backend: "split".into(), message: message.into() }
}

impl Analysis {
    fn new(proto: &pb::ModelProto, scopes: &[String], source: &Path) -> Result<Analysis> {
        let g = proto.graph.as_ref().ok_or_else(|| cut_error(source, "the file has no graph"))?;
        let err = |m: String| cut_error(source, m);
        let layer_of: Vec<Option<usize>> = g
            .node
            .iter()
            .enumerate()
            .map(|(i, n)| layer_index(&n.name).or_else(|| scopes.get(i).and_then(|s| layer_index(s))))
            .collect();
        let found: std::collections::BTreeSet<usize> = layer_of.iter().flatten().copied().collect();
        let layers = found.len();
        if layers == 0 {
            return Err(err(
                "no node name carries an encoder-layer scope (`layers.N/`), so the layer boundaries cannot be found (were node names stripped by an optimizer?)".into(),
            ));
        }
        if found.iter().copied().ne(0..layers) {
            return Err(err(format!("encoder layers {found:?} are not numbered 0..{layers}")));
        }
        let mut producer = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.clone(), i);
            }
        }
        let mut constant: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
        for n in &g.node {
            if n.input.iter().all(|i| i.is_empty() || constant.contains(i)) {
                constant.extend(n.output.iter().cloned());
            }
        }
        let graph_inputs: HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for x in &n.input {
                consumers.entry(x.as_str()).or_default().push(i);
            }
        }
        // a tensor is a mask when, within its layer, it reaches a Softmax through elementwise ops only
        let reaches_softmax = |t: &str, layer: usize| -> bool {
            let mut frontier = vec![(t.to_string(), 0)];
            while let Some((x, depth)) = frontier.pop() {
                for &c in consumers.get(x.as_str()).map_or(&[][..], |v| v.as_slice()) {
                    if layer_of[c] != Some(layer) {
                        continue;
                    }
                    let op = g.node[c].op_type.as_str();
                    if op == "Softmax" {
                        return true;
                    }
                    if depth < 4 && matches!(op, "Add" | "Cast" | "Where" | "Expand" | "Slice" | "Mul" | "Sub") {
                        frontier.extend(g.node[c].output.iter().map(|o| (o.clone(), depth + 1)));
                    }
                }
            }
            false
        };
        let mut residual = Vec::with_capacity(layers + 1);
        let mut mask: Option<String> = None;
        for layer in 0..layers {
            let mut external: Vec<(&str, usize)> = Vec::new();
            for (i, n) in g.node.iter().enumerate() {
                if layer_of[i] != Some(layer) {
                    continue;
                }
                for x in &n.input {
                    let outside = match producer.get(x) {
                        Some(&p) => layer_of[p] != Some(layer),
                        None => graph_inputs.contains(x.as_str()),
                    };
                    if !x.is_empty() && !constant.contains(x) && outside && !external.iter().any(|(e, _)| e == x) {
                        external.push((x.as_str(), i));
                    }
                }
            }
            let (masks, streams): (Vec<_>, Vec<_>) = external.into_iter().partition(|(t, _)| reaches_softmax(t, layer));
            match streams.as_slice() {
                [(t, _)] => residual.push(t.to_string()),
                [] => return Err(err(format!("layer {layer} reads no residual stream from outside itself"))),
                many => {
                    let list: Vec<String> =
                        many.iter().map(|(t, n)| format!("`{t}` (read by node `{}`)", g.node[*n].name)).collect();
                    return Err(err(format!(
                        "layer {layer} reads {} tensors from before it, not one residual stream: {} — the graph cannot be cut there",
                        many.len(),
                        list.join(", ")
                    )));
                }
            }
            for (t, n) in masks {
                let before_layers = producer.get(t).is_none_or(|&p| layer_of[p].is_none());
                match &mask {
                    _ if !before_layers => {
                        return Err(err(format!(
                            "node `{}` adds `{t}` to its attention logits, but `{t}` is computed inside another layer",
                            g.node[n].name
                        )))
                    }
                    Some(m) if m != t => {
                        return Err(err(format!(
                            "the layers add different attention masks (`{m}`, `{t}` at node `{}`)",
                            g.node[n].name
                        )))
                    }
                    _ => mask = Some(t.to_string()),
                }
            }
            if layer > 0 {
                let p = producer.get(&residual[layer]).copied();
                if p.map(|p| layer_of[p]) != Some(Some(layer - 1)) {
                    return Err(err(format!(
                        "layer {layer}'s residual input `{}` is not produced by layer {}",
                        residual[layer],
                        layer - 1
                    )));
                }
            }
        }
        // the stream leaving the last layer: what nodes after the layers read from it
        let last = layers - 1;
        let graph_outputs: HashSet<&str> = g.output.iter().map(|v| v.name.as_str()).collect();
        let mut leaving: Vec<&str> = Vec::new();
        for (i, n) in g.node.iter().enumerate() {
            if layer_of[i] == Some(last) {
                for o in &n.output {
                    let read_after =
                        consumers.get(o.as_str()).is_some_and(|cs| cs.iter().any(|&c| layer_of[c].is_none()))
                            || graph_outputs.contains(o.as_str());
                    if read_after && !constant.contains(o) {
                        leaving.push(o.as_str());
                    }
                }
            }
        }
        match leaving.as_slice() {
            [t] => residual.push(t.to_string()),
            [] => return Err(err(format!("nothing after layer {last} reads its output"))),
            many => return Err(err(format!("the head reads {} tensors out of layer {last}: {many:?}", many.len()))),
        }
        let keys = (0..layers)
            .map(|layer| {
                g.node
                    .iter()
                    .enumerate()
                    .rfind(|(i, n)| layer_of[*i] == Some(layer) && n.name.contains("k_proj/"))
                    .and_then(|(_, n)| n.output.first().cloned())
            })
            .collect();
        let float = g
            .output
            .first()
            .and_then(|o| match o.r#type.as_ref()?.value.as_ref()? {
                pb::type_proto::Value::TensorType(t) => Some(t.elem_type),
            })
            .unwrap_or(pb::tensor_proto::DataType::Float as i32);
        let opset =
            proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(18, |o| o.version);
        let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        Ok(Analysis {
            source: source.to_path_buf(),
            layers,
            layer_of,
            producer,
            constant,
            residual,
            mask,
            keys,
            float,
            inputs: g.input.iter().filter(|v| !inits.contains(v.name.as_str())).cloned().collect(),
            outputs: g.output.clone(),
            opset,
        })
    }

    fn err(&self, m: String) -> Error {
        cut_error(&self.source, m)
    }

    /// The nodes computing `outputs` from `stop` (and constants), in graph order, and the
    /// initializers they read. `allowed` is the layer range whose nodes may appear (`None`
    /// entries, outside any layer, always may).
    fn slice(
        &self,
        g: &pb::GraphProto,
        outputs: &[String],
        stop: &HashSet<String>,
        allowed: Option<[usize; 2]>,
        stage: &str,
    ) -> Result<(Vec<pb::NodeProto>, Vec<pb::TensorProto>)> {
        let inputs: HashSet<&str> = self.inputs.iter().map(|v| v.name.as_str()).collect();
        // (tensor, the node that reads it)
        let mut need: Vec<(String, Option<usize>)> = outputs.iter().map(|o| (o.clone(), None)).collect();
        let mut seen_t: HashSet<String> = HashSet::new();
        let mut nodes: std::collections::BTreeSet<usize> = Default::default();
        let mut inits: HashSet<String> = HashSet::new();
        let init_names: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let reader =
            |r: Option<usize>| r.map_or("a stage output".to_string(), |i| format!("node `{}`", g.node[i].name));
        while let Some((t, by)) = need.pop() {
            if t.is_empty() || stop.contains(&t) || !seen_t.insert(t.clone()) {
                continue;
            }
            if init_names.contains(t.as_str()) {
                inits.insert(t);
                continue;
            }
            match self.producer.get(&t) {
                Some(&p) => {
                    if let (Some(l), Some([a, b])) = (self.layer_of[p], allowed) {
                        if (l < a || l >= b) && !self.constant.contains(&t) {
                            let what = match self.residual.iter().position(|r| *r == t) {
                                Some(k) => format!("the residual stream after layer {} (features from several layers?)", k as i64 - 1),
                                None => format!("`{t}` from node `{}` of layer {l}", g.node[p].name),
                            };
                            return Err(self.err(format!(
                                "the {stage} (layers {a}..{b}) reads {what} through {}: only the stream between the stages may cross a cut",
                                reader(by)
                            )));
                        }
                    }
                    nodes.insert(p);
                    need.extend(g.node[p].input.iter().map(|i| (i.clone(), Some(p))));
                    // subgraph attributes (If/Loop) read outer tensors too
                    for a in &g.node[p].attribute {
                        for sub in a.g.iter().chain(&a.graphs) {
                            need.extend(outer_names(sub).into_iter().map(|i| (i, Some(p))));
                        }
                    }
                }
                None if inputs.contains(t.as_str()) => {
                    return Err(self.err(format!(
                        "the {stage} needs graph input `{t}` (read by {}) other than through the residual stream, so the graph cannot be cut there",
                        reader(by)
                    )))
                }
                None => {
                    return Err(self.err(format!("tensor `{t}` has no producer")));
                }
            }
        }
        let nodes = nodes.into_iter().map(|i| g.node[i].clone()).collect();
        let inits = g.initializer.iter().filter(|t| inits.contains(&t.name)).cloned().collect();
        Ok((nodes, inits))
    }

    /// `vision_embed`: the graph inputs → `hidden_states` (the stream entering layer 0).
    fn embed(&self, proto: &pb::ModelProto, hidden: usize) -> Result<pb::ModelProto> {
        let g = graph(proto);
        let inputs: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        let (mut nodes, inits) = self.slice(g, &[self.residual[0].clone()], &inputs, Some([0, 0]), "embed stage")?;
        rename(&mut nodes, &self.residual[0], HIDDEN_IN);
        let out = vec![self.value(HIDDEN_IN, &[sym("views"), sym("tokens"), fixed(hidden)])];
        Ok(self.model(proto, "vision_embed", nodes, inits, self.inputs.clone(), out))
    }

    /// `vision_blocks_K` for layers `[a, b)`.
    fn group(
        &self,
        proto: &pb::ModelProto,
        a: usize,
        b: usize,
        hidden: usize,
        heads: Option<usize>,
    ) -> Result<pb::ModelProto> {
        let g = graph(proto);
        let stop: HashSet<String> = std::iter::once(self.residual[a].clone()).chain(self.mask.clone()).collect();
        let key = heads.and(self.keys[b - 1].clone());
        let mut wanted = vec![self.residual[b].clone()];
        wanted.extend(key.clone());
        let (mut nodes, inits) = self.slice(g, &wanted, &stop, Some([a, b]), &format!("group of layers {a}..{b}"))?;
        self.check_no_folded_tokens(g, &nodes, hidden, heads, a, b)?;
        rename(&mut nodes, &self.residual[a], HIDDEN_IN);
        rename(&mut nodes, &self.residual[b], HIDDEN_OUT);
        let mut pre = Vec::new();
        let bias4 = "glimpse_attention_bias_4d";
        pre.push(self.constant_i64("glimpse_bias_axes", &[1, 2]));
        pre.push(if self.opset >= 13 {
            node("Unsqueeze", "glimpse_bias_unsqueeze", &[BIAS, "glimpse_bias_axes"], &[bias4])
        } else {
            with_ints(node("Unsqueeze", "glimpse_bias_unsqueeze", &[BIAS], &[bias4]), "axes", &[1, 2])
        });
        match &self.mask {
            Some(m) => rename_inputs(&mut nodes, m, bias4),
            None => {
                let mut added = 0;
                let mut out = Vec::with_capacity(nodes.len());
                for mut n in nodes {
                    if n.op_type == "Softmax" && !n.input.is_empty() {
                        let logits = n.input[0].clone();
                        let biased = format!("{}_glimpse_biased", n.name);
                        let mut bias_for = bias4.to_string();
                        if self.float != pb::tensor_proto::DataType::Float as i32 {
                            bias_for = format!("{}_glimpse_bias", n.name);
                            out.push(node(
                                "CastLike",
                                &format!("{}_glimpse_castlike", n.name),
                                &[bias4, &logits],
                                &[&bias_for],
                            ));
                        }
                        out.push(node(
                            "Add",
                            &format!("{}_glimpse_bias_add", n.name),
                            &[&logits, &bias_for],
                            &[&biased],
                        ));
                        n.input[0] = biased;
                        added += 1;
                    }
                    out.push(n);
                }
                if added != b - a {
                    return Err(self.err(format!(
                        "layers {a}..{b} have {added} Softmax nodes, not one per layer: the attention bias has nowhere to go"
                    )));
                }
                nodes = out;
            }
        }
        let mut outputs = vec![self.value(HIDDEN_OUT, &[sym("views"), sym("tokens"), fixed(hidden)])];
        if let (Some(k), Some(h)) = (key, heads) {
            nodes.push(self.constant_i64("glimpse_keys_shape", &[0, 0, h as i64, -1]));
            nodes.push(node("Reshape", "glimpse_keys_heads", &[&k, "glimpse_keys_shape"], &["glimpse_keys_by_head"]));
            if self.opset >= 18 {
                nodes.push(self.constant_i64("glimpse_keys_axis", &[2]));
            }
            nodes.push(if self.opset >= 18 {
                let mut n =
                    node("ReduceMean", "glimpse_keys_mean", &["glimpse_keys_by_head", "glimpse_keys_axis"], &[KEYS]);
                n.attribute.push(int_attr("keepdims", 0));
                n
            } else {
                let mut n = with_ints(
                    node("ReduceMean", "glimpse_keys_mean", &["glimpse_keys_by_head"], &[KEYS]),
                    "axes",
                    &[2],
                );
                n.attribute.push(int_attr("keepdims", 0));
                n
            });
            outputs.push(self.value(KEYS, &[sym("views"), sym("tokens"), fixed(hidden / h)]));
        }
        pre.extend(nodes);
        let inputs = vec![
            self.value(HIDDEN_IN, &[sym("views"), sym("tokens"), fixed(hidden)]),
            self.value(BIAS, &[sym("views"), sym("tokens")]),
        ];
        Ok(self.model(proto, &format!("vision_blocks_{a}_{b}"), pre, inits, inputs, outputs))
    }

    /// Refuses a group whose shape constants fix a size other than the model's widths — the
    /// token count folded in by a static-shape export — since the group could then run on the
    /// full grid only.
    fn check_no_folded_tokens(
        &self,
        g: &pb::GraphProto,
        nodes: &[pb::NodeProto],
        hidden: usize,
        heads: Option<usize>,
        a: usize,
        b: usize,
    ) -> Result<()> {
        let mut widths: Vec<i64> = vec![-1, 0, 1, hidden as i64];
        if let Some(h) = heads {
            widths.extend([h as i64, (hidden / h.max(1)) as i64]);
        }
        for n in nodes {
            let shape_input = match n.op_type.as_str() {
                "Reshape" | "Expand" | "Tile" => n.input.get(1),
                "ConstantOfShape" => n.input.first(),
                _ => None,
            };
            let Some(values) = shape_input.and_then(|t| constant_ints(g, nodes, t)) else { continue };
            if let Some(v) = values.iter().find(|v| !widths.contains(v)) {
                return Err(self.err(format!(
                    "node `{}` (layers {a}..{b}) uses the constant shape {values:?}: the size {v} is folded into the graph (a static-shape export), so the layers cannot run on fewer tokens; re-export the encoder with a dynamic sequence axis",
                    n.name
                )));
            }
        }
        Ok(())
    }

    /// `vision_head`: the stream leaving the last layer → the monolithic outputs.
    fn head(&self, proto: &pb::ModelProto, hidden: usize) -> Result<pb::ModelProto> {
        let g = graph(proto);
        let last = &self.residual[self.layers];
        let names: Vec<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let stop: HashSet<String> = std::iter::once(last.clone()).collect();
        let (mut nodes, inits) = self.slice(g, &names, &stop, Some([self.layers, self.layers]), "head")?;
        rename(&mut nodes, last, HIDDEN_IN);
        let inputs = vec![self.value(HIDDEN_IN, &[sym("views"), sym("tokens"), fixed(hidden)])];
        Ok(self.model(proto, "vision_head", nodes, inits, inputs, self.outputs.clone()))
    }

    fn value(&self, name: &str, dims: &[pb::tensor_shape_proto::Dimension]) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: self.float,
                    shape: Some(pb::TensorShapeProto { dim: dims.to_vec() }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn constant_i64(&self, name: &str, values: &[i64]) -> pb::NodeProto {
        let t = pb::TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        };
        let mut n = node("Constant", name, &[], &[name]);
        n.attribute.push(pb::AttributeProto {
            name: "value".into(),
            r#type: pb::attribute_proto::AttributeType::Tensor as i32,
            t: Some(t),
            ..Default::default()
        });
        n
    }

    fn model(
        &self,
        proto: &pb::ModelProto,
        name: &str,
        nodes: Vec<pb::NodeProto>,
        initializer: Vec<pb::TensorProto>,
        input: Vec<pb::ValueInfoProto>,
        output: Vec<pb::ValueInfoProto>,
    ) -> pb::ModelProto {
        let graph = pb::GraphProto { name: name.into(), node: nodes, initializer, input, output, ..Default::default() };
        pb::ModelProto {
            ir_version: proto.ir_version,
            opset_import: proto.opset_import.clone(),
            producer_name: "glimpse split".into(),
            graph: Some(graph),
            ..Default::default()
        }
    }
}

/// The values of a small int64 constant: an initializer or a `Constant` node's tensor.
fn constant_ints(g: &pb::GraphProto, nodes: &[pb::NodeProto], name: &str) -> Option<Vec<i64>> {
    let ints = |t: &pb::TensorProto| -> Option<Vec<i64>> {
        if t.data_type != pb::tensor_proto::DataType::Int64 as i32 {
            return None;
        }
        if !t.int64_data.is_empty() {
            return Some(t.int64_data.clone());
        }
        (t.raw_data.len().is_multiple_of(8) && t.raw_data.len() <= 64)
            .then(|| t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    };
    if let Some(t) = g.initializer.iter().find(|t| t.name == name) {
        return ints(t);
    }
    let n = nodes.iter().find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))?;
    n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()).and_then(ints)
}

fn graph(proto: &pb::ModelProto) -> &pb::GraphProto {
    proto.graph.as_ref().expect("checked by Analysis::new")
}

/// Names a subgraph reads from its enclosing scope (inputs of its nodes it does not produce).
fn outer_names(g: &pb::GraphProto) -> Vec<String> {
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.initializer.iter().map(|t| t.name.as_str()))
        .chain(g.input.iter().map(|v| v.name.as_str()))
        .collect();
    g.node.iter().flat_map(|n| n.input.iter()).filter(|i| !produced.contains(i.as_str())).cloned().collect()
}

fn rename(nodes: &mut [pb::NodeProto], from: &str, to: &str) {
    for n in nodes.iter_mut() {
        for x in n.input.iter_mut().chain(n.output.iter_mut()) {
            if x == from {
                *x = to.to_string();
            }
        }
    }
}

fn rename_inputs(nodes: &mut [pb::NodeProto], from: &str, to: &str) {
    for n in nodes.iter_mut() {
        for x in n.input.iter_mut() {
            if x == from {
                *x = to.to_string();
            }
        }
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn with_ints(mut n: pb::NodeProto, name: &str, v: &[i64]) -> pb::NodeProto {
    n.attribute.push(pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    });
    n
}

fn sym(s: &str) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(s.into())),
        ..Default::default()
    }
}

fn fixed(n: usize) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(n as i64)),
        ..Default::default()
    }
}

/// A deterministic sample image for the checks: large enough that tiled families make tiles.
fn sample_image() -> image::RgbImage {
    image::RgbImage::from_fn(160, 120, |x, y| {
        image::Rgb([((x * 7 + y * 3) % 256) as u8, ((x * 2 + y * 11) % 256) as u8, ((x ^ y) * 5 % 256) as u8])
    })
}

/// Backends that could not start, with the reason.
type Skipped = Vec<(String, String)>;

/// Loads the scratch stages on each backend that starts and checks them against the monolithic
/// encoder: equal outputs, and groups that run on fewer tokens.
fn verify(
    folder: &ModelFolder,
    monolithic: &Path,
    scratch: &Path,
    stems: &[String],
    opts: &SplitOptions,
) -> Result<(Vec<Verified>, Skipped)> {
    let tokenizer = TextTokenizer::load(folder)?;
    let family = family::for_folder(folder, &tokenizer)?;
    let input = family.preprocess(&sample_image())?;
    let mut verified = Vec::new();
    let mut skipped = Vec::new();
    for name in &opts.backends {
        if let Err(e) = backend::can_start(name, &opts.backend_options) {
            skipped.push((name.clone(), e.to_string()));
            continue;
        }
        let b = backend::by_name(name, &opts.backend_options)?;
        let hints = family.encoder_hints();
        let mono = b.load(monolithic, &folder.root, "vision_encoder", &hints)?;
        let stages: Vec<Box<dyn Session>> = stems
            .iter()
            .enumerate()
            .map(|(k, stem)| {
                let h = match k {
                    0 => hints.clone(),
                    k if k + 1 == stems.len() => family.head_hints(),
                    _ => LoadHints::default(),
                };
                b.load(&scratch.join(format!("{stem}.onnx")), scratch, stem, &h)
            })
            .collect::<Result<_>>()?;
        // the embed stage takes exactly the monolithic encoder's inputs
        let inputs = input.inputs_for(mono.inputs(), family.name())?;
        verified.push(check_backend(b.as_ref(), mono.as_ref(), &stages, &inputs, stems, monolithic, opts.dtype)?);
    }
    if verified.is_empty() {
        return Err(Error::invalid(
            "split backends",
            opts.backends.join(","),
            "none of them can start, so nothing verified the cut",
        ));
    }
    Ok((verified, skipped))
}

fn run_group(session: &dyn Session, hidden: &ArrayD<f32>, stem: &str) -> Result<(ArrayD<f32>, Option<ArrayD<f32>>)> {
    let (v, t) = (hidden.shape()[0], hidden.shape()[1]);
    let bias = Array2::<f32>::zeros((v, t)).into_dyn();
    let mut out = NamedOutputs::new(
        session.outputs(),
        session.run(vec![
            (HIDDEN_IN, as_declared(session, HIDDEN_IN, hidden.clone())),
            (BIAS, as_declared(session, BIAS, bias)),
        ])?,
    );
    let h = out.take(HIDDEN_OUT).ok_or_else(|| Error::interface(stem, "no hidden_states_out"))?.into_f32(stem)?;
    let k = out.take(KEYS).map(|k| k.into_f32(stem)).transpose()?;
    Ok((h, k))
}

fn check_backend(
    b: &dyn Backend,
    mono: &dyn Session,
    stages: &[Box<dyn Session>],
    inputs: &[(&str, Tensor)],
    stems: &[String],
    source: &Path,
    dtype: Dtype,
) -> Result<Verified> {
    let reference = NamedOutputs::new(mono.outputs(), mono.run(inputs.to_vec())?);
    let (embed, rest) = stages.split_first().ok_or_else(|| Error::interface("split", "no stages"))?;
    let (head, groups) = rest.split_last().ok_or_else(|| Error::interface("split", "no head"))?;
    let mut out = NamedOutputs::new(embed.outputs(), embed.run(inputs.to_vec())?);
    let mut hidden =
        out.take(HIDDEN_IN).ok_or_else(|| Error::interface(&stems[0], "no hidden_states"))?.into_f32(&stems[0])?;
    let grid = hidden.shape()[1];
    let fewer = grid.saturating_sub((grid / 4).max(1)).max(1);
    for (k, g) in groups.iter().enumerate() {
        let stem = &stems[k + 1];
        // the token axis is dynamic: the group runs on a subset of the tokens too
        let part = hidden.slice(s![.., ..fewer, ..]).to_owned().into_dyn();
        let (h, keys) = run_group(g.as_ref(), &part, stem).map_err(|e| {
            Error::OnnxLoad {
                path: source.to_path_buf(),
                backend: b.name().into(),
                message: format!(
                    "{stem} does not run on {fewer} of {grid} tokens ({e}); the token count is probably folded into a constant shape — re-export the encoder with a dynamic sequence axis"
                ),
            }
        })?;
        if h.shape()[..2] != [part.shape()[0], fewer] || keys.as_ref().is_some_and(|k| k.shape()[1] != fewer) {
            return Err(Error::OnnxLoad {
                path: source.to_path_buf(),
                backend: b.name().into(),
                message: format!("{stem} on {fewer} tokens returned shape {:?}", h.shape()),
            });
        }
        hidden = run_group(g.as_ref(), &hidden, stem)?.0;
    }
    let mut out =
        NamedOutputs::new(head.outputs(), head.run(vec![(HIDDEN_IN, as_declared(head.as_ref(), HIDDEN_IN, hidden))])?);
    let mut reference = reference;
    let tolerance = if matches!(dtype, Dtype::Fp32 | Dtype::Int8 | Dtype::Uint8 | Dtype::Quantized | Dtype::Q4) {
        1e-5
    } else {
        2e-3
    };
    let mut worst = 0f32;
    for info in mono.outputs() {
        let want = reference.take(&info.name).ok_or_else(|| Error::interface("vision_encoder", "output missing"))?;
        let got = out.take(&info.name).ok_or_else(|| {
            Error::interface(stems.last().map_or("vision_head", String::as_str), format!("no output `{}`", info.name))
        })?;
        let (want, got) = (want.into_f32(&info.name)?, got.into_f32(&info.name)?);
        if want.shape() != got.shape() {
            return Err(Error::OnnxLoad {
                path: source.to_path_buf(),
                backend: b.name().into(),
                message: format!(
                    "chained stages give `{}` shape {:?}, the encoder {:?}",
                    info.name,
                    got.shape(),
                    want.shape()
                ),
            });
        }
        let diff = (&want - &got).iter().fold(0f32, |m, d| m.max(d.abs()));
        let diff = if diff.is_nan() { f32::INFINITY } else { diff };
        worst = worst.max(diff);
    }
    if worst > tolerance {
        return Err(Error::OnnxLoad {
            path: source.to_path_buf(),
            backend: b.name().into(),
            message: format!(
                "chained stages differ from the monolithic encoder by {worst:e} (> {tolerance:e}); nothing written"
            ),
        });
    }
    Ok(Verified { backend: b.name().into(), max_abs_diff: worst, tolerance, fewer_tokens: fewer, grid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_scopes_are_read_from_node_names() {
        assert_eq!(layer_index("/vision_model/encoder/layers.11/mlp/fc1/MatMul"), Some(11));
        assert_eq!(layer_index("/tower/encoder/layer.3/attention/Softmax"), Some(3));
        assert_eq!(layer_index("blocks.0.attn/Add"), Some(0));
        assert_eq!(layer_index("/encoder/layers/Add"), None);
        assert_eq!(layer_index("/mylayers.2/Add"), None);
        assert_eq!(layer_index("Identity_12"), None);
        assert_eq!(
            layer_index("node_add_5 ['', 'model.vision_model', 'model.vision_model.encoder.layers.1', 'add_5']"),
            Some(1)
        );
    }

    #[test]
    fn groups_are_planned_evenly_or_at_the_cuts() {
        let o = |groups, at: Vec<usize>| SplitOptions { groups, at, ..Default::default() };
        let p = Path::new("x.onnx");
        assert_eq!(plan_groups(12, &o(2, vec![]), p).unwrap(), vec![[0, 6], [6, 12]]);
        assert_eq!(plan_groups(5, &o(3, vec![]), p).unwrap(), vec![[0, 2], [2, 4], [4, 5]]);
        assert_eq!(plan_groups(12, &o(2, vec![4, 8]), p).unwrap(), vec![[0, 4], [4, 8], [8, 12]]);
        for (g, at) in [(0, vec![]), (13, vec![]), (2, vec![0]), (2, vec![8, 4]), (2, vec![12])] {
            assert!(plan_groups(12, &o(g, at.clone()), p).is_err(), "{g} {at:?}");
        }
    }
}
