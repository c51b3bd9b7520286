//! TensorBoard event files: what `tensorboard --logdir` reads, written
//! without TensorFlow.
//!
//! The format is a sequence of records, each `u64` length (little endian),
//! `u32` masked CRC-32C of the length bytes, the data, `u32` masked CRC-32C
//! of the data; the data is a protobuf `tensorflow.Event`. The messages are
//! the few fields of `event.proto` / `summary.proto` a scalar needs,
//! declared with `prost`'s derive (no `.proto` compilation step); the CRC
//! comes from the `crc32c` crate. (The Rust TensorBoard writers on crates.io
//! are unmaintained or pull in a whole ML framework; the format is small.)
//!
//! Invariant: every record is written whole by one `write_all` of a
//! buffered writer, and the file's length after a flush is what a
//! checkpoint records, so a resumed run cuts the file back to it and no
//! step appears twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use prost::Message;
use simfreeze_runtime::contract::FreezeState;

/// The event file's name in a run directory (TensorBoard reads any file
/// whose name contains `tfevents`; one fixed name lets a resume find it).
pub const EVENTS_FILE: &str = "events.out.tfevents.simfreeze";

/// `tensorflow.Event` (event.proto), the fields simfreeze writes.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with `simple_value` (a scalar). The field is
/// in a oneof upstream, so it is written even when it is 0.
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// Appends scalars to a run's event file.
pub struct EventWriter {
    out: BufWriter<File>,
}

impl EventWriter {
    /// A writer appending to `out`: a file just created (`fresh`: the
    /// version record goes first), or one a resume cut back to the
    /// checkpoint's length.
    pub fn new(out: BufWriter<File>, fresh: bool) -> Result<EventWriter> {
        let mut w = EventWriter { out };
        if fresh {
            w.record(&Event {
                wall_time: now(),
                step: 0,
                what: Some(What::FileVersion("brain.Event:2".into())),
            })?;
        }
        Ok(w)
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                simple_value: Some(*v as f32),
            })
            .collect();
        self.record(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// Flushes and returns the file's length.
    pub fn flush(&mut self) -> Result<u64> {
        self.out.flush()?;
        Ok(self.out.get_ref().metadata()?.len())
    }

    fn record(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.out.write_all(&rec)?;
        Ok(())
    }
}

/// The scalars of one training step: `train/loss`, `train/lr`, the freeze
/// state it ran under (`freeze/frontier`, `freeze/probe`: the probed block
/// or -1), per-block learning-rate factors when a policy sets any
/// (`lr_factor/block_<i>`), and every scalar the policy logged
/// (`policy/<name>`).
pub fn step_scalars(
    loss: f64,
    lr: f64,
    state: &FreezeState,
    policy: &[(String, f64)],
) -> Vec<(String, f64)> {
    let mut v = vec![
        ("train/loss".to_string(), loss),
        ("train/lr".to_string(), lr),
        ("freeze/frontier".to_string(), f64::from(state.frontier)),
        (
            "freeze/probe".to_string(),
            state.probe.map_or(-1.0, f64::from),
        ),
    ];
    if state.lr_factors.iter().any(|&f| f != 1.0) {
        for (i, f) in state.lr_factors.iter().enumerate() {
            v.push((format!("lr_factor/block_{i}"), f64::from(*f)));
        }
    }
    for (name, value) in policy {
        v.push((format!("policy/{name}"), *value));
    }
    v
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads records back, checking both CRCs.
    fn records(bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn masked_crc_matches_tensorflows_known_value() {
        // crc32c("123456789") = 0xE3069283 (the CRC-32C check value);
        // masked as TensorFlow does, ((crc >> 15) | (crc << 17)) +
        // 0xa282ead8, that is 0xC78AB0E5.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_round_trip_and_zero_is_written() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(EVENTS_FILE);
        let open = |len: Option<u64>| {
            let out = crate::run::log::open_truncated(&path, len, None).unwrap();
            EventWriter::new(out, len.is_none()).unwrap()
        };
        let mut w = open(None);
        w.scalars(3, &[("a".into(), 0.0), ("b".into(), 2.5)])
            .unwrap();
        let len = w.flush().unwrap();
        w.scalars(4, &[("a".into(), 1.0)]).unwrap();
        w.flush().unwrap();
        drop(w);
        let mut w = open(Some(len));
        w.scalars(5, &[("a".into(), 7.0)]).unwrap();
        w.flush().unwrap();
        let events = records(&std::fs::read(&path).unwrap());
        assert_eq!(events.len(), 3, "version, step 3, step 5 (step 4 cut)");
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(events[1].step, 3);
        match &events[1].what {
            Some(What::Summary(s)) => {
                assert_eq!(s.value[0].tag, "a");
                assert_eq!(s.value[0].simple_value, Some(0.0));
                assert_eq!(s.value[1].simple_value, Some(2.5));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events[2].step, 5);
    }
}
