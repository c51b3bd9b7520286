//! How a run ends: the model and `summary.json`, or the typed stop with
//! its status and the command that resumes it.

use super::*;

impl Trainer {
    /// Writes the final files: the model when every epoch ran, the summary
    /// always; a stopped run becomes a [`RunStopped`] error.
    pub(super) fn finish(
        mut self,
        stop: Option<Stop>,
        identity: PolicyIdentity,
    ) -> Result<Summary> {
        self.progress.finish_line();
        self.writer.wait()?;
        self.log.flush()?;
        let world = self.totals.world_size;
        let (stop, digests) = match stop {
            // The ranks' final weights must agree: a digest of each (none
            // in one process).
            None => match self.engine.weight_digests() {
                Ok(d) => (None, d),
                Err(e) => (Some(Stop::Peer(e)), Vec::new()),
            },
            stop => (stop, Vec::new()),
        };
        let Some(stop) = stop else {
            if self.writes {
                self.engine.save_model(&self.dir.file(MODEL_FILE))?;
            }
            if digests.iter().any(|d| *d != digests[0]) {
                eprintln!(
                    "warning: the ranks' final weights differ (digests {digests:x?}); the run \
                     lost its invariant, please report it"
                );
            }
            let ended = (Status::Completed, None);
            let mut summary = self.summary_of(ended, identity);
            summary.weight_digests = digests.iter().map(|d| format!("{d:016x}")).collect();
            return self.write_summary(summary);
        };
        let reason = stop.reason();
        let summary = self.summary_of((stop.status(), Some(reason.clone())), identity);
        self.write_summary(summary)?;
        if matches!(
            stop,
            Stop::Interrupted { .. } | Stop::Diverged { .. } | Stop::Policy(_)
        ) {
            // Stops every rank reaches at the same step: no rank exits (and
            // has torchrun stop rank 0 while its checkpoint writer may still
            // be busy) before rank 0 waited for it and wrote the summary. A
            // failed group cannot meet.
            let _ = self.engine.barrier();
        }
        if !self.writes {
            // Rank 0 writes (or is writing) the checkpoint and says how to
            // resume; this rank may look before it is there.
            return Err(RunStopped {
                status: stop.status(),
                reason,
                resume: "\n(rank 0 reports the checkpoint and how to resume)".into(),
                dir: self.dir.path.clone(),
                exit_code: stop.exit_code(),
            }
            .into());
        }
        let has_checkpoint = checkpoint::load_meta(&self.dir.path)?.is_some();
        let launcher = match world {
            1 => String::new(),
            n => format!("torchrun --nproc-per-node {n} --no-python "),
        };
        Err(RunStopped {
            status: stop.status(),
            reason,
            resume: if has_checkpoint {
                format!(
                    "\nresume with: {launcher}{} run --resume {}",
                    crate::error::command_name(),
                    self.dir.path.display()
                )
            } else {
                "\n(no checkpoint was written yet; start again)".into()
            },
            dir: self.dir.path.clone(),
            exit_code: stop.exit_code(),
        }
        .into())
    }

    pub(super) fn summary_of(
        &self,
        ended: (Status, Option<String>),
        identity: PolicyIdentity,
    ) -> Summary {
        let t = self.driver.timeline();
        let at = (self.dir.path.clone(), device_name(self.engine.device()));
        Summary {
            provenance: Some(self.provenance.clone()),
            ..Summary::new(ended, &self.totals, t, identity, at)
        }
    }

    /// Writes `summary.json` (rank 0 only) and returns the summary.
    pub(super) fn write_summary(&self, summary: Summary) -> Result<Summary> {
        if self.writes {
            self.dir.write_json(SUMMARY_FILE, &summary)?;
        }
        Ok(summary)
    }
}
