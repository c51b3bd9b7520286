//! A reader for MATLAB level-5 `.mat` files, enough for dataset split lists
//! (Stanford Dogs' `train_list.mat`: cell arrays of file names and a
//! numeric label vector). Little-endian files, compressed (`miCOMPRESSED`)
//! or not; cell, char and numeric arrays. Anything else is skipped.

use std::collections::BTreeMap;
use std::io::Read;

/// A decoded MATLAB array.
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    /// A cell array, column-major.
    Cell(Vec<MatValue>),
    /// A char array as one string (rows concatenated column-major for 1xN).
    Char(String),
    /// A numeric array as f64, column-major.
    Num(Vec<f64>),
    /// Another class (struct, sparse, ...), not decoded.
    Other,
}

impl MatValue {
    /// The strings of a cell array of char arrays (nested 1x1 cells are
    /// unwrapped, as Stanford Dogs' lists have them).
    pub fn strings(&self) -> Option<Vec<String>> {
        match self {
            MatValue::Cell(items) => items
                .iter()
                .map(|v| match v {
                    MatValue::Char(s) => Some(s.clone()),
                    MatValue::Cell(inner) if inner.len() == 1 => match &inner[0] {
                        MatValue::Char(s) => Some(s.clone()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

const MX_CELL: u8 = 1;
const MX_CHAR: u8 = 4;

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("truncated at byte {at}"))
}

/// One data element: its type, payload and where the next one starts.
fn element(b: &[u8], at: usize) -> Result<(u32, &[u8], usize), String> {
    let tag = u32_at(b, at)?;
    if tag >> 16 != 0 {
        // Small data element: type and size share the first word.
        let size = (tag >> 16) as usize;
        let data = b
            .get(at + 4..at + 4 + size)
            .ok_or_else(|| format!("truncated small element at byte {at}"))?;
        return Ok((tag & 0xffff, data, at + 8));
    }
    let size = u32_at(b, at + 4)? as usize;
    let data = b
        .get(at + 8..at + 8 + size)
        .ok_or_else(|| format!("element at byte {at} claims {size} bytes past the end"))?;
    let next = if tag == MI_COMPRESSED {
        at + 8 + size
    } else {
        at + 8 + size.div_ceil(8) * 8
    };
    Ok((tag, data, next))
}

fn numbers(ty: u32, d: &[u8]) -> Result<Vec<f64>, String> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            d.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect()
        };
    }
    Ok(match ty {
        MI_INT8 => d.iter().map(|v| *v as i8 as f64).collect(),
        MI_UINT8 | MI_UTF8 => d.iter().map(|v| *v as f64).collect(),
        MI_INT16 => conv!(i16, 2),
        MI_UINT16 | MI_UTF16 => conv!(u16, 2),
        MI_INT32 => conv!(i32, 4),
        MI_UINT32 => conv!(u32, 4),
        MI_SINGLE => conv!(f32, 4),
        MI_DOUBLE => conv!(f64, 8),
        MI_INT64 => conv!(i64, 8),
        MI_UINT64 => conv!(u64, 8),
        t => return Err(format!("unsupported numeric type {t}")),
    })
}

fn matrix(d: &[u8]) -> Result<(String, MatValue), String> {
    if d.is_empty() {
        return Ok((String::new(), MatValue::Cell(Vec::new())));
    }
    let (_, flags, at) = element(d, 0)?;
    let class = *flags.first().ok_or("empty array flags")?;
    let (_, dims, at) = element(d, at)?;
    let n = dims
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()).max(0) as usize)
        .try_fold(1usize, |a, b| a.checked_mul(b))
        .ok_or("array dimensions overflow")?;
    let (_, name, mut at) = element(d, at)?;
    let name = String::from_utf8_lossy(name).into_owned();
    let value = match class {
        MX_CELL => {
            // Every cell takes at least 8 bytes: a corrupt count cannot
            // make us reserve more than the data holds.
            let mut items = Vec::with_capacity(n.min(d.len() / 8));
            for _ in 0..n {
                let (ty, sub, next) = element(d, at)?;
                if ty != MI_MATRIX {
                    return Err(format!("cell item of type {ty}"));
                }
                items.push(matrix(sub)?.1);
                at = next;
            }
            MatValue::Cell(items)
        }
        MX_CHAR => {
            let (ty, data, _) = element(d, at)?;
            let codes = numbers(ty, data)?;
            let s = if ty == MI_UTF8 {
                String::from_utf8_lossy(data).into_owned()
            } else {
                codes
                    .iter()
                    .map(|c| char::from_u32(*c as u32).unwrap_or('\u{fffd}'))
                    .collect()
            };
            MatValue::Char(s)
        }
        6..=15 => {
            let (ty, data, _) = element(d, at)?;
            MatValue::Num(numbers(ty, data)?)
        }
        _ => MatValue::Other,
    };
    Ok((name, value))
}

fn variables(b: &[u8], mut at: usize, out: &mut BTreeMap<String, MatValue>) -> Result<(), String> {
    while at + 8 <= b.len() {
        let (ty, data, next) = element(b, at)?;
        match ty {
            MI_MATRIX => {
                let (name, v) = matrix(data)?;
                out.insert(name, v);
            }
            MI_COMPRESSED => {
                let mut raw = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .read_to_end(&mut raw)
                    .map_err(|e| format!("bad compressed element at byte {at}: {e}"))?;
                variables(&raw, 0, out)?;
            }
            _ => {}
        }
        at = next;
    }
    Ok(())
}

/// Parses a level-5 MAT file's bytes into its named variables.
pub fn parse(bytes: &[u8]) -> Result<BTreeMap<String, MatValue>, String> {
    if bytes.len() < 128 {
        return Err("shorter than the 128-byte MAT header".into());
    }
    if bytes[124..126] == [0x00, 0x02] || bytes[124..126] == [0x02, 0x00] {
        return Err("MATLAB v7.3 (HDF5) files are not supported; save with -v7 or -v6".into());
    }
    if &bytes[126..128] != b"IM" {
        return Err(if &bytes[126..128] == b"MI" {
            "big-endian MAT files are not supported".into()
        } else {
            "not a MATLAB level-5 file (no endian marker)".into()
        });
    }
    let mut out = BTreeMap::new();
    variables(bytes, 128, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut v = ty.to_le_bytes().to_vec();
        v.extend((data.len() as u32).to_le_bytes());
        v.extend(data);
        while v.len() % 8 != 0 {
            v.push(0);
        }
        v
    }

    fn char_array(s: &str) -> Vec<u8> {
        let mut d = el(MI_UINT32, &[MX_CHAR, 0, 0, 0, 0, 0, 0, 0]);
        d.extend(el(MI_INT32, &[1, 0, 0, 0, s.len() as u8, 0, 0, 0]));
        d.extend(el(MI_INT8, b""));
        let utf16: Vec<u8> = s.bytes().flat_map(|c| [c, 0]).collect();
        d.extend(el(MI_UINT16, &utf16));
        el(MI_MATRIX, &d)
    }

    #[test]
    fn reads_a_cell_of_strings_and_refuses_garbage() {
        let mut cell = el(MI_UINT32, &[MX_CELL, 0, 0, 0, 0, 0, 0, 0]);
        cell.extend(el(MI_INT32, &[2, 0, 0, 0, 1, 0, 0, 0]));
        cell.extend(el(MI_INT8, b"files"));
        cell.extend(char_array("a/b.jpg"));
        cell.extend(char_array("c.jpg"));
        let mut file = vec![b' '; 126];
        file.extend(b"IM");
        file.extend(el(MI_MATRIX, &cell));
        let vars = parse(&file).unwrap();
        assert_eq!(
            vars["files"].strings().unwrap(),
            vec!["a/b.jpg".to_string(), "c.jpg".to_string()]
        );
        assert!(parse(b"short").is_err());
        let mut bad = file.clone();
        bad.truncate(150);
        assert!(parse(&bad).is_err());
    }
}
