//! A run's provenance: the checkpoint it started from (by SHA-256), the
//! machine, libtorch and the code revision, recorded in `summary.json` so
//! that two tables can be told comparable or not.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::run::records::Provenance;

/// The environment variable that names the code revision when the program
/// runs away from its source tree (a copied binary).
pub const REVISION_VAR: &str = "SIMFREEZE_REVISION";

impl Provenance {
    /// The provenance of a run on `device` with `threads` libtorch threads,
    /// started from `weights` (a file, or a directory of files).
    pub fn collect(weights: Option<&Path>, device: String, threads: i64) -> Provenance {
        Provenance {
            weights_sha256: weights.and_then(|w| sha256_of(w).ok()),
            cpu: cpu_model(),
            threads,
            device,
            libtorch: option_env!("SIMFREEZE_LIBTORCH_VERSION")
                .unwrap_or("unknown")
                .to_string(),
            revision: revision(),
        }
    }

    /// `cpu (N threads, device)`: the machine in a few words.
    pub fn machine(&self) -> String {
        let s = if self.threads == 1 { "" } else { "s" };
        format!("{} ({} thread{s}, {})", self.cpu, self.threads, self.device)
    }
}

/// The SHA-256 (hex) of a file, or of a directory as the digest of its
/// files' names and digests in name order.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    if path.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)?
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.path())
            .collect();
        names.sort();
        let mut h = Sha256::new();
        for p in names {
            h.update(p.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(sha256_of(&p)?.as_bytes());
        }
        return Ok(hex(&h.finalize()));
    }
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `/proc/cpuinfo`'s first `model name`, or `unknown CPU`.
fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// `SIMFREEZE_REVISION`, else `git describe --always --dirty` of the
/// source tree this program was built from, else `unknown`.
fn revision() -> String {
    if let Ok(r) = std::env::var(REVISION_VAR) {
        if !r.trim().is_empty() {
            return r.trim().to_string();
        }
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("git")
        .arg("-C")
        .arg(source)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_digest_is_its_sha256_and_a_directory_follows_its_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("model.safetensors");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_of(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let before = sha256_of(d.path()).unwrap();
        fs::write(&f, b"abd").unwrap();
        assert_ne!(sha256_of(d.path()).unwrap(), before);
        let p = Provenance::collect(Some(&f), "cpu".into(), 2);
        assert_eq!(p.weights_sha256, Some(sha256_of(&f).unwrap()));
        assert!(
            p.machine().ends_with(" (2 threads, cpu)"),
            "{}",
            p.machine()
        );
        assert_eq!(
            Provenance::collect(None, "cpu".into(), 1).weights_sha256,
            None
        );
    }
}
