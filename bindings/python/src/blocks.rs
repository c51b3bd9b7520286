//! The per-block reductions of contract 2 as the Python side hands them
//! to `Policy.observe`: read from `{set: (rows, dim, tokens, grams)}`,
//! checked against what the policy asked for, and owned.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use simfreeze_abi::ffi::Needs;
use simfreeze_runtime::more::BlocksData;

use crate::f32s;

/// One set of samples' per-block reductions, as handed over: `rows`
/// samples, tokens `layers × rows × dim`, Gram matrices `layers × rows ×
/// rows`.
pub(crate) struct BlocksIn {
    rows: usize,
    dim: usize,
    tokens: Option<Vec<f32>>,
    grams: Option<Vec<f32>>,
}

/// The sets of samples a step's block reductions cover, by the names the
/// Python side passes (`<set>_tokens`, `<set>_grams`).
pub(crate) const SETS: [&str; 4] = ["batch", "batch_reference", "fixed", "fixed_reference"];

/// `{set: (rows, dim, tokens bytes or None, grams bytes or None)}` as
/// handed over by the Python side.
pub(crate) fn blocks_in(d: &Bound<'_, PyDict>) -> PyResult<Vec<(String, BlocksIn)>> {
    let mut out = Vec::new();
    for (k, v) in d.iter() {
        let name: String = k.extract()?;
        let (rows, dim, tokens, grams): (
            usize,
            usize,
            Option<Bound<'_, PyBytes>>,
            Option<Bound<'_, PyBytes>>,
        ) = v.extract()?;
        let tokens = tokens
            .map(|b| f32s(&format!("{name}_tokens"), b.as_bytes()))
            .transpose()?;
        let grams = grams
            .map(|b| f32s(&format!("{name}_grams"), b.as_bytes()))
            .transpose()?;
        out.push((
            name,
            BlocksIn {
                rows,
                dim,
                tokens,
                grams,
            },
        ));
    }
    Ok(out)
}

/// The per-block reductions `asked` needs, checked and owned; `None`
/// for a set that is not needed at this step.
pub(crate) fn reductions(
    name: &str,
    layers: usize,
    asked: Needs,
    blocks: Vec<(String, BlocksIn)>,
    reference_step: Option<u64>,
) -> PyResult<[Option<BlocksData>; 4]> {
    let mut out: [Option<BlocksData>; 4] = Default::default();
    for (name, _) in &blocks {
        if !SETS.contains(&name.as_str()) {
            return Err(PyValueError::new_err(format!(
                "block observations of `{name}`: the sets are {}",
                SETS.join(", ")
            )));
        }
    }
    let reductions = asked.intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS);
    if reductions.is_empty() {
        return Ok(out);
    }
    let probe = asked.contains(Needs::FIXED_BATCH);
    let reference = asked.contains(Needs::REFERENCE) && reference_step.is_some();
    let needed = [true, reference, probe, probe && reference];
    let mut given: Vec<Option<BlocksIn>> = SETS.iter().map(|_| None).collect();
    for (name, b) in blocks {
        let i = SETS.iter().position(|s| *s == name).expect("checked");
        given[i] = Some(b);
    }
    let mut missing = Vec::new();
    for (i, set) in SETS.iter().enumerate() {
        if !needed[i] {
            continue;
        }
        let b = given[i].take();
        let (rows, dim) = b.as_ref().map_or((0, 0), |b| (b.rows, b.dim));
        let mut data = BlocksData {
            first: 0,
            blocks: layers,
            rows,
            dim,
            ..Default::default()
        };
        let (tokens, grams) = b.map_or((None, None), |b| (b.tokens, b.grams));
        if reductions.contains(Needs::BLOCK_TOKENS) {
            match tokens {
                Some(t) if t.len() == layers * rows * dim => data.tokens = t,
                Some(t) => {
                    return Err(PyValueError::new_err(format!(
                        "{set}_tokens: {} values for {layers} blocks x {rows} samples x {dim}",
                        t.len()
                    )))
                }
                None => missing.push(format!("{set}_tokens (blocks x samples x dim)")),
            }
        }
        if reductions.contains(Needs::BLOCK_GRAMS) {
            match grams {
                Some(g) if g.len() == layers * rows * rows => data.grams = g,
                Some(g) => {
                    return Err(PyValueError::new_err(format!(
                        "{set}_grams: {} values for {layers} blocks x {rows} x {rows} samples",
                        g.len()
                    )))
                }
                None => missing.push(format!("{set}_grams (blocks x samples x samples)")),
            }
        }
        out[i] = Some(data);
    }
    if !missing.is_empty() {
        return Err(PyValueError::new_err(format!(
            "policy `{}` asked at the previous step to observe {} at this step; pass {} to \
             observe() (simfreeze.torch.FreezeController computes them)",
            name,
            asked.names().join(", "),
            missing.join(", ")
        )));
    }
    Ok(out)
}
