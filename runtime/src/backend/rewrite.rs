//! Graph rewrites applied to an ONNX model before tract parses it, for patterns other exporters
//! write that tract cannot analyse although their meaning is plain. Each rewrite keeps the
//! model's outputs exactly (it replaces a node by an equivalent one); each has a unit test here
//! and an end-to-end test on a `models/compat/` folder.
//!
//! - [`single_output_split`]: a `Split` with one output is the identity (ONNX requires the
//!   split sizes to add up to the axis), but torch's dynamo exporter computes that one size from
//!   data (`split_with_sizes` over the real tiles of an Idefics3 batch), and tract needs
//!   constant split sizes.
//! - [`bool_equal`]: `Equal` on booleans (valid ONNX since opset 11; the dynamo exporter writes
//!   it for attention masks) is `Not(Xor(a, b))`; tract's `Equal` evaluates numbers only.
//! - [`mask_sums_in_f64`]: an integer `ReduceSum` of a boolean mask sums the same in f64, which
//!   tract runs with its kernels instead of through its symbolic-dimension type (speed only).
//!
//! One rewrite changes an output on purpose, for both backends, when the caller asks
//! (`LoadHints::last_position_logits`): [`last_position_logits`] makes a decoder's `logits`
//! the last position's row only, which is all generation reads.

use tract_onnx::pb;

/// Names of what [`last_position_logits`] adds.
const LAST: [&str; 5] = [
    "glimpse/last_position",
    "glimpse/last_position_hidden",
    "glimpse/last_start",
    "glimpse/last_end",
    "glimpse/last_axis",
];

/// A decoder whose `logits` come from `MatMul(hidden, lm_head)` (or, in q4 files, its
/// `MatMulNBits` form) computes them for the last
/// position only: `Slice(hidden, -1:, axis 1)` goes before the projection and the declared
/// output becomes `[batch, 1, vocab]`. Returns whether the graph had that pattern (and was not
/// rewritten already). The prompt's other rows are never read (generation takes the last one),
/// so this saves their projection and the `seq x vocab` output: 69 MB for a 348-token SmolVLM
/// prompt, 845 MB for a 1391-token LLaVA-OneVision one.
pub fn last_position_logits(proto: &mut pb::ModelProto) -> bool {
    let Some(g) = proto.graph.as_mut() else { return false };
    if g.node.iter().any(|n| n.name == LAST[0]) {
        return false;
    }
    // fp32/fp16 `MatMul(hidden, w)`, or q4's `com.microsoft.MatMulNBits(hidden, w_q4, scales, ..)`
    let projection = |n: &pb::NodeProto| match n.op_type.as_str() {
        "MatMul" => n.domain.is_empty() && n.input.len() == 2,
        "MatMulNBits" => n.domain == "com.microsoft" && n.input.len() >= 3,
        _ => false,
    };
    let Some(ix) = g.node.iter().position(|n| projection(n) && n.output.first().is_some_and(|o| o == "logits")) else {
        return false;
    };
    let konst = |name: &str, v: i64| pb::TensorProto {
        name: name.into(),
        dims: vec![1],
        data_type: 7,
        int64_data: vec![v],
        ..Default::default()
    };
    g.initializer.extend([konst(LAST[2], -1), konst(LAST[3], i64::MAX), konst(LAST[4], 1)]);
    let hidden = std::mem::replace(&mut g.node[ix].input[0], LAST[1].to_string());
    let slice = pb::NodeProto {
        op_type: "Slice".into(),
        name: LAST[0].into(),
        input: vec![hidden, LAST[2].into(), LAST[3].into(), LAST[4].into()],
        output: vec![LAST[1].into()],
        ..Default::default()
    };
    g.node.insert(ix, slice);
    use pb::tensor_shape_proto::dimension::Value;
    if let Some(pb::type_proto::Value::TensorType(t)) =
        g.output.iter_mut().find(|o| o.name == "logits").and_then(|o| o.r#type.as_mut()).and_then(|t| t.value.as_mut())
    {
        if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.get_mut(1)) {
            d.value = Some(Value::DimValue(1));
        }
    }
    true
}

/// Applies every rewrite to the model's graph (and subgraphs); returns the names of those that
/// changed something, for messages.
pub fn for_tract(proto: &mut pb::ModelProto) -> Vec<&'static str> {
    let mut applied = Vec::new();
    if let Some(g) = proto.graph.as_mut() {
        if walk(g, &mut single_output_split) > 0 {
            applied.push("single-output Split -> Identity");
        }
        if bool_equal(g) > 0 {
            applied.push("boolean Equal -> Not(Xor)");
        }
        if mask_sums_in_f64(g) > 0 {
            applied.push("integer sums of a mask -> f64 sums");
        }
    }
    applied
}

/// Runs `f` on every node of the graph and its subgraphs; returns how many nodes it changed.
fn walk(g: &mut pb::GraphProto, f: &mut dyn FnMut(&mut pb::NodeProto) -> bool) -> usize {
    let mut changed = 0;
    for node in &mut g.node {
        for attr in &mut node.attribute {
            if let Some(sub) = attr.g.as_mut() {
                changed += walk(sub, f);
            }
            for sub in &mut attr.graphs {
                changed += walk(sub, f);
            }
        }
        changed += usize::from(f(node));
    }
    changed
}

/// ONNX element type code of `bool`.
const BOOL: i32 = 9;

/// Ops whose output is boolean.
const BOOL_OPS: [&str; 10] =
    ["Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor", "IsNaN"];

/// Rewrites `Equal(a, b) -> y` on booleans into `Xor(a, b) -> y/xor; Not(y/xor) -> y` in one
/// graph (not its subgraphs); a value is boolean by its declared type (inputs, initializers,
/// value_info) or by the op that makes it. Returns how many were rewritten.
pub fn bool_equal(g: &mut pb::GraphProto) -> usize {
    let is_bool = bool_values(g);
    let mut out = Vec::with_capacity(g.node.len());
    let mut changed = 0;
    for mut n in std::mem::take(&mut g.node) {
        let bools = n.input.len() == 2 && n.input.iter().all(|i| is_bool.contains(i));
        if n.op_type == "Equal" && n.domain.is_empty() && bools && n.output.len() == 1 {
            let y = n.output[0].clone();
            let xor = format!("{y}/glimpse_xor");
            n.op_type = "Xor".into();
            n.output = vec![xor.clone()];
            let not = pb::NodeProto {
                name: format!("{y}/glimpse_not"),
                op_type: "Not".into(),
                input: vec![xor],
                output: vec![y],
                ..Default::default()
            };
            out.push(n);
            out.push(not);
            changed += 1;
        } else {
            out.push(n);
        }
    }
    g.node = out;
    changed
}

/// The integer sums [`mask_sums_in_f64`] rewrites: node index -> (the 0/1 value before the
/// integer cast, the integer type).
fn mask_sums(g: &pb::GraphProto) -> std::collections::HashMap<usize, (String, i64)> {
    let is_bool = bool_values(g);
    let mut producer: std::collections::HashMap<&str, &pb::NodeProto> = std::collections::HashMap::new();
    for n in &g.node {
        for o in &n.output {
            producer.insert(o.as_str(), n);
        }
    }
    let cast_to = |n: &pb::NodeProto| -> Option<i64> {
        if n.op_type != "Cast" || !n.domain.is_empty() {
            return None;
        }
        n.attribute.iter().find(|a| a.name == "to").map(|a| a.i)
    };
    // whether `v` holds only 0 and 1: a boolean, through integer casts and shape-only ops
    let zero_one = |start: &str| {
        let mut v: &str = start;
        for _ in 0..32 {
            if is_bool.contains(v) {
                return true;
            }
            let Some(n) = producer.get(v) else { return false };
            let passes = matches!(cast_to(n), Some(INT32 | INT64))
                || (n.domain.is_empty() && SHAPE_OPS.contains(&n.op_type.as_str()));
            match n.input.first() {
                Some(i) if passes => v = i,
                _ => return false,
            }
        }
        false
    };
    let mut targets = std::collections::HashMap::new();
    for (ix, n) in g.node.iter().enumerate() {
        if n.op_type != "ReduceSum" || !n.domain.is_empty() || n.output.len() != 1 {
            continue;
        }
        let Some(cast) = n.input.first().and_then(|i| producer.get(i.as_str())) else { continue };
        if let (Some(to @ (INT32 | INT64)), Some(m)) = (cast_to(cast), cast.input.first()) {
            if zero_one(m) {
                targets.insert(ix, (m.clone(), to));
            }
        }
    }
    targets
}

/// The values of one graph known to be boolean: by declared type (inputs, initializers,
/// value_info, outputs) or by the op that makes them.
fn bool_values(g: &pb::GraphProto) -> std::collections::HashSet<String> {
    let mut is_bool: std::collections::HashSet<String> = std::collections::HashSet::new();
    let declared = g.input.iter().chain(&g.value_info).chain(&g.output);
    for v in declared {
        let elem = v.r#type.as_ref().and_then(|t| match &t.value {
            Some(pb::type_proto::Value::TensorType(tt)) => Some(tt.elem_type),
            _ => None,
        });
        if elem == Some(BOOL) {
            is_bool.insert(v.name.clone());
        }
    }
    is_bool.extend(g.initializer.iter().filter(|t| t.data_type == BOOL).map(|t| t.name.clone()));
    for n in &g.node {
        let cast_to_bool = n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && a.i == BOOL as i64);
        if n.domain.is_empty() && (BOOL_OPS.contains(&n.op_type.as_str()) || cast_to_bool) {
            is_bool.extend(n.output.iter().cloned());
        }
    }
    is_bool
}

/// ONNX element type codes of the integers a mask is summed in, and of `double`.
const INT32: i64 = 6;
const INT64: i64 = 7;
const DOUBLE: i64 = 11;

/// Ops that move or select elements without changing them.
const SHAPE_OPS: [&str; 8] = ["Reshape", "Slice", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Expand", "Identity"];

/// Rewrites `ReduceSum(Cast<int>(m)) -> y`, where `m` holds only 0 and 1 (a boolean, cast to
/// integers and reshaped or sliced on the way), into `Cast<int>(ReduceSum(Cast<double>(m)))`,
/// in one graph: the same integers, as sums of 0s and 1s are exact in f64 below 2^53 terms.
/// Idefics3 / SmolVLM embeddings count each patch's valid pixels this way; tract reduces
/// integers through its symbolic-dimension type (0.7 of the 1.0 ms testbed-smolvlm embed stage,
/// 7.7 ms per 512x512 view at real size) and floats with its kernels. Returns how many sums
/// were rewritten.
pub fn mask_sums_in_f64(g: &mut pb::GraphProto) -> usize {
    let mut targets = mask_sums(g);
    let changed = targets.len();
    let cast = |name: String, input: String, output: String, to: i64| pb::NodeProto {
        name,
        op_type: "Cast".into(),
        input: vec![input],
        output: vec![output],
        attribute: vec![pb::AttributeProto { name: "to".into(), r#type: 2, i: to, ..Default::default() }],
        ..Default::default()
    };
    let mut out = Vec::with_capacity(g.node.len() + 2 * changed);
    for (ix, mut n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        let Some((m, to)) = targets.remove(&ix) else {
            out.push(n);
            continue;
        };
        let y = std::mem::take(&mut n.output[0]);
        let (terms, sum) = (format!("{y}/glimpse_f64_terms"), format!("{y}/glimpse_f64_sum"));
        out.push(cast(format!("{y}/glimpse_to_f64"), m, terms.clone(), DOUBLE));
        n.input[0] = terms;
        n.output[0] = sum.clone();
        out.push(n);
        out.push(cast(format!("{y}/glimpse_back"), sum, y, to));
    }
    g.node = out;
    changed
}

/// `Split(x, split) -> y` with a single output is `Identity(x) -> y`.
pub fn single_output_split(node: &mut pb::NodeProto) -> bool {
    if node.op_type != "Split" || !node.domain.is_empty() || node.output.len() != 1 || node.input.is_empty() {
        return false;
    }
    node.op_type = "Identity".into();
    node.input.truncate(1);
    node.attribute.clear();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: vec![pb::AttributeProto { name: "axis".into(), i: 0, ..Default::default() }],
            ..Default::default()
        }
    }

    /// The declared f32 tensor `name` with dimensions `d`.
    fn info(name: &str, d: &[pb::tensor_shape_proto::dimension::Value]) -> pb::ValueInfoProto {
        tensor_info(name, 1, d)
    }

    /// The declared tensor `name` of ONNX element type `elem_type` with dimensions `d`.
    fn tensor_info(name: &str, elem_type: i32, d: &[pb::tensor_shape_proto::dimension::Value]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::Dimension;
        let dim = d.iter().map(|v| Dimension { value: Some(v.clone()), ..Default::default() }).collect();
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The decoder's projection runs on the last position: tract's result is the last row of
    /// the full product, the declared output says `[batch, 1, vocab]`, and a second call (or a
    /// graph without the pattern) changes nothing.
    #[test]
    fn logits_are_projected_at_the_last_position_only() {
        use pb::tensor_shape_proto::dimension::Value;
        use tract_onnx::prelude::*;
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    op_type: "MatMul".into(),
                    input: vec!["hidden".into(), "w".into()],
                    output: vec!["logits".into()],
                    ..Default::default()
                }],
                initializer: vec![pb::TensorProto {
                    name: "w".into(),
                    dims: vec![2, 4],
                    data_type: 1,
                    float_data: w,
                    ..Default::default()
                }],
                input: vec![info("hidden", &[Value::DimValue(1), Value::DimValue(3), Value::DimValue(2)])],
                output: vec![info("logits", &[Value::DimValue(1), Value::DimParam("S".into()), Value::DimValue(4)])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let hidden = tract_ndarray::Array3::from_shape_vec((1, 3, 2), vec![1f32, 0., 0., 1., 2., 3.]).unwrap();
        let run = |p: &pb::ModelProto| {
            let plan =
                tract_onnx::onnx().model_for_proto_model(p).unwrap().into_optimized().unwrap().into_runnable().unwrap();
            plan.run(tvec!(hidden.clone().into_tensor().into())).unwrap()[0]
                .clone()
                .into_tensor()
                .into_plain_array::<f32>()
                .unwrap()
        };
        let full = run(&proto);
        assert!(last_position_logits(&mut proto));
        assert!(!last_position_logits(&mut proto), "applied once");
        let last = run(&proto);
        assert_eq!(last.shape(), &[1, 1, 4]);
        assert_eq!(last.as_slice().unwrap(), full.slice(tract_ndarray::s![0, 2, ..]).as_slice().unwrap());
        let g = proto.graph.as_ref().unwrap();
        let Some(pb::type_proto::Value::TensorType(t)) = g.output[0].r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            panic!("no tensor type")
        };
        assert_eq!(t.shape.as_ref().unwrap().dim[1].value, Some(Value::DimValue(1)));
        let mut other = pb::ModelProto { graph: Some(pb::GraphProto::default()), ..Default::default() };
        assert!(!last_position_logits(&mut other));
    }

    /// The same on q4's projection, `com.microsoft.MatMulNBits` (4-bit blocks of 32 along K,
    /// symmetric: value = (q - 8) * scale): only the last row is computed, and it equals the
    /// last row of the full product.
    #[test]
    fn q4_logits_are_projected_at_the_last_position_only() {
        use pb::tensor_shape_proto::dimension::Value;
        use tract_onnx::prelude::*;
        const K: usize = 32;
        const N: usize = 4;
        let int = |name: &str, i: i64| pb::AttributeProto { name: name.into(), r#type: 2, i, ..Default::default() };
        // column n, row k: q = 8 + ((n + k) % 5) - 2, two nibbles per byte, low first
        let q = |n: usize, k: usize| (8 + (n + k) % 5 - 2) as u8;
        let packed: Vec<u8> =
            (0..N).flat_map(|n| (0..K / 2).map(move |b| q(n, 2 * b) | (q(n, 2 * b + 1) << 4))).collect();
        let mut proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 17 },
                pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 },
            ],
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    op_type: "MatMulNBits".into(),
                    domain: "com.microsoft".into(),
                    input: vec!["hidden".into(), "w_q4".into(), "w_scales".into()],
                    output: vec!["logits".into()],
                    attribute: vec![int("K", K as i64), int("N", N as i64), int("bits", 4), int("block_size", 32)],
                    ..Default::default()
                }],
                initializer: vec![
                    pb::TensorProto {
                        name: "w_q4".into(),
                        dims: vec![N as i64, 1, K as i64 / 2],
                        data_type: 2,
                        raw_data: packed,
                        ..Default::default()
                    },
                    pb::TensorProto {
                        name: "w_scales".into(),
                        dims: vec![N as i64],
                        data_type: 1,
                        float_data: (0..N).map(|n| 0.5 + n as f32).collect(),
                        ..Default::default()
                    },
                ],
                input: vec![info("hidden", &[Value::DimValue(1), Value::DimValue(3), Value::DimValue(K as i64)])],
                output: vec![info(
                    "logits",
                    &[Value::DimValue(1), Value::DimParam("S".into()), Value::DimValue(N as i64)],
                )],
                ..Default::default()
            }),
            ..Default::default()
        };
        let hidden =
            tract_ndarray::Array3::from_shape_fn((1, 3, K), |(_, s, k)| ((s * 7 + k * 3) % 11) as f32 * 0.1 - 0.5);
        let run = |p: &pb::ModelProto| {
            let plan = tract_onnx::onnx().model_for_proto_model(p).unwrap().into_runnable().unwrap();
            plan.run(tvec!(hidden.clone().into_tensor().into())).unwrap()[0]
                .clone()
                .into_tensor()
                .into_plain_array::<f32>()
                .unwrap()
        };
        let full = run(&proto);
        // the reference: dequantized weights times the hidden states
        for s in 0..3 {
            for n in 0..N {
                let want: f32 = (0..K).map(|k| hidden[[0, s, k]] * (f32::from(q(n, k)) - 8.0) * (0.5 + n as f32)).sum();
                assert!((full[[0, s, n]] - want).abs() < 1e-4, "row {s} col {n}: {} vs {want}", full[[0, s, n]]);
            }
        }
        assert!(last_position_logits(&mut proto), "MatMulNBits is the projection");
        let last = run(&proto);
        assert_eq!(last.shape(), &[1, 1, N]);
        // one row may take another kernel than three (matrix-vector): equal up to rounding
        for n in 0..N {
            assert!(
                (last[[0, 0, n]] - full[[0, 2, n]]).abs() < 1e-5,
                "col {n}: {} vs {}",
                last[[0, 0, n]],
                full[[0, 2, n]]
            );
        }
    }

    #[test]
    fn only_single_output_splits_become_identities() {
        let mut one = node("Split", &["x", "sizes"], &["y"]);
        assert!(single_output_split(&mut one));
        assert_eq!((one.op_type.as_str(), one.input.len(), one.attribute.len()), ("Identity", 1, 0));
        let mut two = node("Split", &["x", "sizes"], &["a", "b"]);
        assert!(!single_output_split(&mut two));
        assert_eq!(two.op_type, "Split");
        let mut other = node("Concat", &["x"], &["y"]);
        assert!(!single_output_split(&mut other));
        let mut proto = pb::ModelProto {
            graph: Some(pb::GraphProto { node: vec![node("Split", &["x"], &["y"]), two], ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(for_tract(&mut proto), vec!["single-output Split -> Identity"]);
        assert!(for_tract(&mut proto).is_empty(), "nothing left to rewrite");
    }

    #[test]
    fn boolean_equals_become_not_xor_and_numeric_ones_stay() {
        let mut g = pb::GraphProto {
            node: vec![
                node("Less", &["a", "b"], &["m"]),
                node("Equal", &["m", "m2"], &["y"]),
                node("Equal", &["a", "b"], &["z"]),
            ],
            initializer: vec![pb::TensorProto { name: "m2".into(), data_type: BOOL, ..Default::default() }],
            ..Default::default()
        };
        assert_eq!(bool_equal(&mut g), 1);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, vec!["Less", "Xor", "Not", "Equal"]);
        assert_eq!(g.node[2].output, vec!["y".to_string()]);
        assert_eq!(g.node[1].output, g.node[2].input);
    }
    /// An integer sum of a boolean mask (cast, reshaped, cast again, as Idefics3 counts a patch's
    /// valid pixels) sums in f64 and gives tract the same integers; a sum of numbers cast to
    /// integers stays as it is, and a second pass finds nothing.
    #[test]
    fn integer_sums_of_masks_sum_in_f64_with_the_same_result() {
        use pb::tensor_shape_proto::dimension::Value;
        use tract_onnx::prelude::*;
        let int = |name: &str, i: i64| pb::AttributeProto { name: name.into(), r#type: 2, i, ..Default::default() };
        let cast =
            |i: &str, o: &str, to: i64| pb::NodeProto { attribute: vec![int("to", to)], ..node("Cast", &[i], &[o]) };
        let ints = |name: &str, v: Vec<i64>| pb::TensorProto {
            name: name.into(),
            dims: vec![v.len() as i64],
            data_type: 7,
            int64_data: v,
            ..Default::default()
        };
        let typed =
            |name: &str, elem_type: i32| tensor_info(name, elem_type, &[Value::DimValue(2), Value::DimValue(6)]);
        let sum = |i: &str, o: &str| pb::NodeProto {
            attribute: vec![int("keepdims", 0)],
            ..node("ReduceSum", &[i, "axes"], &[o])
        };
        let mut proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(pb::GraphProto {
                node: vec![
                    cast("mask", "m32", INT32),
                    pb::NodeProto { attribute: vec![], ..node("Reshape", &["m32", "shape"], &["r"]) },
                    cast("r", "r64", INT64),
                    sum("r64", "count"),
                    cast("x", "x64", INT64),
                    pb::NodeProto { attribute: vec![], ..node("Reshape", &["x64", "shape"], &["xr"]) },
                    sum("xr", "total"),
                ],
                initializer: vec![ints("shape", vec![2, 2, 3]), ints("axes", vec![2])],
                input: vec![typed("mask", BOOL), info("x", &[Value::DimValue(2), Value::DimValue(6)])],
                output: vec![typed("count", 7), typed("total", 7)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mask: Vec<bool> = (0..12).map(|i| i % 3 != 1 && i != 6).collect();
        let x: Vec<f32> = (0..12).map(|i| i as f32 * 1.5).collect();
        let run = |p: &pb::ModelProto| {
            let plan =
                tract_onnx::onnx().model_for_proto_model(p).unwrap().into_optimized().unwrap().into_runnable().unwrap();
            let inputs = tvec!(
                tract_ndarray::Array2::from_shape_vec((2, 6), mask.clone()).unwrap().into_tensor().into(),
                tract_ndarray::Array2::from_shape_vec((2, 6), x.clone()).unwrap().into_tensor().into()
            );
            let outs = plan.run(inputs).unwrap();
            outs.iter()
                .map(|o| {
                    o.cast_to::<i64>()
                        .unwrap()
                        .to_plain_array_view::<i64>()
                        .unwrap()
                        .iter()
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        let before = run(&proto);
        assert_eq!(before[0], vec![2, 2, 1, 2], "the masks' counts");
        assert_eq!(for_tract(&mut proto), vec!["integer sums of a mask -> f64 sums"]);
        assert!(for_tract(&mut proto).is_empty(), "nothing left to rewrite");
        let g = proto.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Cast", "Reshape", "Cast", "Cast", "ReduceSum", "Cast", "Cast", "Reshape", "ReduceSum"]);
        assert_eq!(run(&proto), before);
    }
}
