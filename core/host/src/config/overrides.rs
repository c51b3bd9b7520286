//! RON parsing with errors that name what is valid, `--set key=value`
//! overrides on any configuration, and telling a comparison's
//! configuration from a run's.

use super::*;

/// Applies `key=value` overrides (dotted keys, RON values) to any
/// configuration; an unknown key or a value of the wrong type is an error.
pub fn apply_overrides<T: Serialize + serde::de::DeserializeOwned>(
    value: T,
    sets: &[String],
) -> Result<T, UsageError> {
    if sets.is_empty() {
        return Ok(value);
    }
    // JSON values keep enum variants and options apart, which RON's
    // dynamic `Value` cannot; the tree is only an intermediate.
    let mut tree = serde_json::to_value(&value).map_err(|e| UsageError(e.to_string()))?;
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--set {set}: expected key=value")))?;
        let new = ron_value_to_json(raw)
            .map_err(|e| UsageError(format!("--set {set}: value is not RON: {e}")))?;
        *slot_of(&mut tree, key).map_err(|why| UsageError(format!("--set {set}: {why}")))? = new;
    }
    serde_json::from_value(tree).map_err(|e| UsageError(format!("--set: {e}")))
}

/// The value at the dotted `key`; an unknown key names the keys valid
/// where it went wrong.
fn slot_of<'a>(
    tree: &'a mut serde_json::Value,
    key: &str,
) -> Result<&'a mut serde_json::Value, String> {
    let mut cur = tree;
    let mut path = String::new();
    for part in key.split('.') {
        let at = if path.is_empty() {
            "the top level".to_string()
        } else {
            format!("`{path}`")
        };
        cur = match cur {
            serde_json::Value::Object(map) => {
                let valid: Vec<String> = map.keys().cloned().collect();
                match map.get_mut(part) {
                    Some(v) => v,
                    None => {
                        return Err(format!(
                            "unknown key `{key}`: {at} has {}",
                            valid.join(", ")
                        ))
                    }
                }
            }
            serde_json::Value::Null => {
                return Err(format!(
                    "unknown key `{key}`: {at} is not set; set it whole (e.g. `{path}=(...)`)"
                ))
            }
            _ => return Err(format!("unknown key `{key}`: {at} has no fields")),
        };
        path = if path.is_empty() {
            part.to_string()
        } else {
            format!("{path}.{part}")
        };
    }
    Ok(cur)
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// A RON value as serde_json's tree: RON's dynamic `Value` drops enum
/// variant names, so `Bf16` (a unit variant) and `Cub(root: "...")` (a
/// struct variant) are recognised here and written the way serde_json
/// represents variants; `Some(x)` is `x` and `None` is null.
fn ron_value_to_json(raw: &str) -> Result<serde_json::Value, String> {
    let t = raw.trim();
    match t {
        "None" => return Ok(serde_json::Value::Null),
        "true" | "false" => {}
        _ if is_ident(t) => return Ok(serde_json::Value::String(t.into())),
        _ => {}
    }
    if let Some(open) = t.find('(') {
        let name = &t[..open];
        if is_ident(name) && t.ends_with(')') {
            let inner = &t[open..];
            if name == "Some" {
                return ron_value_to_json(&inner[1..inner.len() - 1]);
            }
            let v: ron::Value = ron::from_str(inner).map_err(|e| e.code.to_string())?;
            let v = serde_json::to_value(v).map_err(|e| e.to_string())?;
            return Ok(serde_json::json!({ name: v }));
        }
    }
    let v: ron::Value = ron::from_str(t).map_err(|e| e.code.to_string())?;
    serde_json::to_value(v).map_err(|e| e.to_string())
}

/// Parses RON text with optional fields taking plain values; errors give
/// `origin:line:column`.
pub fn parse_ron<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, UsageError> {
    // `implicit_some`: optional fields take plain values (`depth: 4`,
    // `policy: (plugin: "atsf")`); `Some(..)` is accepted too.
    let ron =
        ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    ron.from_str(text).map_err(|e| {
        UsageError(format!(
            "{origin}:{}:{}: {}",
            e.position.line, e.position.col, e.code
        ))
    })
}

/// A top-level key only a `simfreeze compare` configuration has, when
/// `text` is one (so `simfreeze run` can say so instead of naming the key
/// it does not know).
pub(super) fn comparison_key(text: &str) -> Option<&'static str> {
    let ron::Value::Map(map) = ron::from_str::<ron::Value>(text).ok()? else {
        return None;
    };
    [
        "finetune",
        "pretrain",
        "seeds",
        "policies",
        "confirm_seeds",
        "backbone",
    ]
    .into_iter()
    .find(|k| {
        map.keys()
            .any(|key| key == &ron::Value::String((*k).into()))
    })
}
