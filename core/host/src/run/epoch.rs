//! The step loop of one epoch, and its end: fetch the batch, step the
//! engine under the driver's freeze state, hand the step to the policy,
//! log and checkpoint when due; evaluate and write the epoch's row.

use super::feed::Fetched;
use super::group::local_share;
use super::*;

impl Trainer {
    /// The steps of one epoch (the rest of it, after a resume).
    pub(super) fn epoch(&mut self, control: &RunControl) -> Result<EpochEnd> {
        let (spe, batch) = (self.steps_per_epoch, self.config.train.batch);
        let epoch = self.totals.step / spe;
        let started = Instant::now();
        let order_vec = self.data.train.order(self.config.train.seed, epoch);
        // Data-parallel: each step's global batch (the one-process order's
        // next `batch * world` samples) is split into one contiguous share
        // per rank, in rank order.
        let (rank, world) = self.engine.shard();
        let order_vec = local_share(order_vec, spe, batch as usize, rank, world);
        let prefetch = self.data.prefetch(
            &order_vec,
            (batch as usize, (self.totals.step % spe) as usize),
            (self.config.train.seed, epoch),
            self.engine.device(),
        );
        let order = Tensor::from_slice(&order_vec);
        let needs = self.driver.needs();
        let mut lr = 0.0;
        while self.totals.step < self.total && self.totals.step / spe == epoch {
            let step = self.totals.step;
            // The main thread's time outside the engine's step: this
            // iteration's, less the step's.
            let iteration = Instant::now();
            if self.data.faults.kill_due(step) {
                // The fault is a process lost after its last checkpoint
                // reached the disk (the background write finished), so
                // that what it leaves is the same on every machine.
                self.writer.wait()?;
                self.data.faults.kill_if_due(step);
            }
            let idx = order.narrow(0, (step % spe) as i64 * batch, batch);
            let state = self.driver.state().clone();
            let asked = state.observe();
            // A step whose batch the policy observes block by block starts
            // from the images, not from the activation cache.
            let cached = match Observer::needs_images(asked) {
                true => 0,
                false => state.frontier as usize,
            };
            let fetched = fetch(
                &mut self.data,
                &*self.engine,
                prefetch.as_ref(),
                &idx,
                (step, cached),
            );
            let (input, y_host, y) = match fetched? {
                Fetched::Batch(input, y_host, y) => (input, y_host, y),
                Fetched::Failed(error) => return Ok(EpochEnd::Stopped(self.torch_stop(error))),
            };
            let more = match &self.observer {
                Some(o) => {
                    let engine = &*self.engine;
                    torch_guard(
                        || format!("observing step {step} for the policy"),
                        || o.before_step(engine, &input, asked),
                    )??
                }
                None => MoreData::default(),
            };
            if let Some(o) = &self.observer {
                // Every rank observes the global batch.
                let (batch, frozen) = (self.totals.global_batch as f64, state.frozen_prefix());
                let units = o.step_cost(asked, batch, frozen as usize) * world as f64;
                self.driver.charge_observation(units);
            }
            lr = self.engine.lr_at(step, self.total);
            let plan = StepPlan {
                lr,
                frozen: state.frozen_prefix() as usize,
                lr_factors: &state.lr_factors,
                grad_norms: needs.contains(Needs::GRAD_NORMS),
                features: needs.contains(Needs::CLS_FEATURES),
                accumulate: self.observer.as_ref().is_some_and(Observer::accumulates),
                stop_vote: control.should_stop(step + 1),
                decision: state_digest(&state),
            };
            let next = (step + 1 < self.total && (step + 1) / spe == epoch)
                .then_some(prefetch.as_ref())
                .flatten();
            let (stepped, step_seconds) = self.timed_step(input, &y, &plan, next);
            let out = match stepped {
                Ok(out) => out,
                Err(e) => return Ok(EpochEnd::Stopped(self.step_stop(e, step, epoch))),
            };
            self.epoch_loss += out.loss;
            if let Some(c) = out.comm {
                self.record_comm(step, c)?;
            }
            let at = StepAt {
                step,
                epoch,
                steps_per_epoch: spe,
                total_steps: self.total,
                num_classes: self.data.train.classes as usize,
                lr,
            };
            let frontier = state.frontier as usize;
            let outcome = match self.decide(&out, &y_host, at, more, frontier)? {
                Decided::Outcome(o) => o,
                Decided::PolicyFailed(e) => return policy_failure(e),
            };
            self.log_step((step, lr), &state, &out, &outcome)?;
            self.totals.step += 1;
            let frontier = self.driver.state().frontier;
            self.progress
                .tick(step + 1, out.loss, batch * world as i64, frontier);
            // Data-parallel ranks stop where they all agreed to (the votes
            // travel with the step's first collective).
            let asked = match world {
                1 => control.should_stop(step + 1),
                _ => out.stop,
            };
            let stopping = asked && step + 1 < self.total;
            let every = self.config.train.checkpoint_every;
            let due = every > 0 && (step + 1) % every == 0 && (step + 1) % spe != 0;
            if stopping || due {
                let seconds = self.carried_seconds + started.elapsed().as_secs_f64();
                self.checkpoint(self.epoch_loss, seconds)?;
            }
            self.totals.host.steps += 1;
            self.totals.host.outside_seconds +=
                (iteration.elapsed().as_secs_f64() - step_seconds).max(0.0);
            if stopping {
                // The other ranks wait for rank 0's checkpoint: none exits
                // (and has torchrun stop the group) before it is written.
                self.writer.wait()?;
                if let Err(e) = self.engine.barrier() {
                    return Ok(EpochEnd::Stopped(Stop::Peer(e)));
                }
                let (step, total) = (step + 1, self.total);
                return Ok(EpochEnd::Stopped(Stop::Interrupted { step, total }));
            }
        }
        let seconds = self.carried_seconds + started.elapsed().as_secs_f64();
        Ok(EpochEnd::Done { epoch, seconds, lr })
    }

    /// A step's event, its recorded observation and its TensorBoard
    /// scalars.
    pub(super) fn log_step(
        &mut self,
        (step, lr): (u64, f64),
        state: &simfreeze_runtime::contract::FreezeState,
        out: &StepOut,
        outcome: &StepOutcome,
    ) -> Result<()> {
        self.log.events(&Event::of_step(step, outcome))?;
        if let Some(record) = self.driver.take_record() {
            self.log.observation(&record)?;
        }
        let mut scalars = tensorboard::step_scalars(out.loss, lr, state, &outcome.scalars);
        if let Some(c) = out.comm {
            scalars.push(("comm/allreduce_bytes".into(), c.bytes as f64));
            scalars.push(("comm/seconds".into(), c.seconds));
        }
        self.log.scalars(step, &scalars)
    }

    /// The engine's step, with the next batch's upload (from `next`, the
    /// epoch's batch thread when the next step is in this epoch) queued for
    /// the step's first host read, so that it goes up behind the step's
    /// work (on a GPU on a side stream); the seconds of the step, less the
    /// upload's time on this thread, which counts outside the step.
    pub(super) fn timed_step(
        &mut self,
        input: Batch,
        y: &Tensor,
        plan: &StepPlan<'_>,
        next: Option<&Prefetch>,
    ) -> (Result<StepOut, StepError>, f64) {
        if let Some(p) = next {
            reads::before_next_read(p.upload_ahead());
        }
        let (in_step, reads_before) = (Instant::now(), reads::count());
        let stepped = self.engine.step(input, y, plan);
        reads::cancel_before_read();
        let ahead = next.map_or(0.0, Prefetch::take_ahead_seconds);
        self.totals.host.reads += reads::count() - reads_before;
        (stepped, (in_step.elapsed().as_secs_f64() - ahead).max(0.0))
    }

    /// How a failed step stops the run.
    pub(super) fn step_stop(&self, e: StepError, step: u64, epoch: u64) -> Stop {
        match e {
            StepError::Diverged(loss) => Stop::Diverged { step, epoch, loss },
            StepError::Torch(e) => self.torch_stop(TorchError {
                during: format!("at step {step}"),
                ..e
            }),
            StepError::Comm(e) => Stop::Peer(e),
        }
    }

    /// Hands the step to the policy: completes the on-demand observations
    /// (the accumulated gradient norms include the step), lets the policy
    /// decide, and takes the reference snapshot it asked for. A policy's
    /// failure is an outcome ([`Decided::PolicyFailed`]); the error is the
    /// host's.
    pub(super) fn decide(
        &mut self,
        out: &StepOut,
        y_host: &Tensor,
        at: StepAt,
        mut more: MoreData,
        frontier: usize,
    ) -> Result<Decided> {
        if let Some(o) = &self.observer {
            o.after_step(&mut *self.engine, &mut more, frontier);
        }
        let dim = self.engine.model().feature_dim();
        let outcome = match observe_with(&mut self.driver, out, y_host, dim, at, &more) {
            Ok(o) => o,
            Err(e) => return Ok(Decided::PolicyFailed(e)),
        };
        if let Some(o) = &mut self.observer {
            let (engine, kind, step) = (&*self.engine, outcome.reference(), at.step);
            torch_guard(
                || format!("taking the reference snapshot after step {step}"),
                || o.take_reference(engine, kind, step),
            )??;
            let units = o.cost.snapshot(kind, self.totals.global_batch as f64);
            self.driver
                .charge_observation(units * self.totals.world_size.max(1) as f64);
        }
        Ok(Decided::Outcome(outcome))
    }

    /// Whether `epoch` ends with an evaluation: every epoch, or the last
    /// `train.eval_last` of them.
    fn evaluates(&self, epoch: u64) -> bool {
        let last = self.config.train.eval_last;
        last == 0 || epoch + last >= self.config.train.epochs
    }

    /// Evaluates when due, writes the epoch's metrics row and checkpoints; `Some`
    /// when libtorch failed in the evaluation.
    pub(super) fn end_epoch(&mut self, epoch: u64, seconds: f64, lr: f64) -> Result<Option<Stop>> {
        let eval = if self.evaluates(epoch) {
            match self.engine.evaluate(&self.data.eval) {
                Ok((top1, loss)) => Some((loss, top1)),
                Err(error) => return Ok(Some(self.torch_stop(error))),
            }
        } else {
            None
        };
        self.carried_seconds = 0.0;
        self.totals.train_seconds += seconds;
        if let Some((_, top1)) = eval {
            self.totals.last_top1 = Some(top1);
            self.totals.best_top1 = Some(self.totals.best_top1.map_or(top1, |b| b.max(top1)));
        }
        let train_loss = self.epoch_loss / self.steps_per_epoch.max(1) as f64;
        self.epoch_loss = 0.0;
        // The epoch's last step names the row (records.rs: a record names
        // the step it is true of): the blocks frozen while it ran, not the
        // decision taken after it, and its TensorBoard step.
        let last = self.totals.step.saturating_sub(1);
        let frontier = MetricsRow::frozen_during(&self.driver.timeline().freeze_step, last);
        self.log.metrics(&MetricsRow {
            epoch,
            train_loss,
            eval,
            lr,
            frozen_blocks: frontier,
            allreduce_bytes: self.epoch_comm.bytes,
            comm_seconds: self.epoch_comm.seconds,
            epoch_seconds: seconds,
        })?;
        self.epoch_comm = Comm::default();
        let images = (self.steps_per_epoch * self.totals.global_batch as u64) as f64;
        let mut scalars = vec![
            ("train/epoch_loss".to_string(), train_loss),
            (
                "perf/images_per_sec".to_string(),
                images / seconds.max(1e-9),
            ),
        ];
        if let Some((eval_loss, top1)) = eval {
            scalars.insert(0, ("eval/loss".to_string(), eval_loss));
            scalars.insert(0, ("eval/top1".to_string(), top1));
        }
        if let Some(c) = &self.data.cache {
            scalars.push(("cache/hit_rate".to_string(), c.hit_rate()));
            scalars.push(("cache/advanced_rows".to_string(), c.advanced as f64));
        }
        self.log.scalars(last, &scalars)?;
        let cached = self.data.cache.as_ref().map_or(String::new(), |c| {
            format!(
                ", cache hits {:.0}% ({} stale rows advanced)",
                100.0 * c.hit_rate(),
                c.advanced
            )
        });
        let layers = self.driver.state().layers;
        let evaluated = match eval {
            Some((loss, top1)) => format!("eval loss {loss:.4}, top-1 {top1:.2}%"),
            None => "not evaluated (eval_last)".to_string(),
        };
        let host = self.totals.host;
        let host_ms = 1e3 * host.outside_seconds / host.steps.max(1) as f64;
        self.progress.println(&format!(
            "epoch {epoch}: train loss {train_loss:.4}, {evaluated}, frozen {frontier}/{layers}, {seconds:.1}s ({:.1} img/s, host {host_ms:.2} ms/step outside the step){cached}",
            images / seconds.max(1e-9)
        ));
        self.checkpoint(0.0, 0.0)?;
        Ok(None)
    }

    /// A libtorch failure as a stop, with what to try when the device ran
    /// out of memory.
    pub(super) fn torch_stop(&self, error: TorchError) -> Stop {
        let c = &self.config;
        let hint = if error.is_out_of_memory() {
            format!(
                "\nThe model is {} (depth {}, width {}) at batch {} in {:?} on {}. Try a smaller \
                 train.batch or train.precision: Bf16{}.",
                c.model.preset,
                self.driver.state().layers,
                self.engine.model().feature_dim(),
                c.train.batch,
                c.train.precision,
                device_name(self.engine.device()),
                if c.train.cache_frozen {
                    ", or train.cache_frozen: false (the cache lives in device memory)"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        };
        Stop::Torch { error, hint }
    }

    /// Adds a data-parallel step's communication to the totals; logs an
    /// `allreduce` event when its size changed (the first step, and after
    /// each freeze).
    pub(super) fn record_comm(&mut self, step: u64, c: Comm) -> Result<()> {
        self.epoch_comm.bytes += c.bytes;
        self.epoch_comm.seconds += c.seconds;
        self.totals.allreduce_bytes += c.bytes;
        self.totals.comm_seconds += c.seconds;
        if self.last_allreduce != Some(c.bytes) {
            self.last_allreduce = Some(c.bytes);
            self.log.events(&[Event {
                step,
                kind: records::EventKind::Allreduce {
                    bytes: c.bytes,
                    params: c.params,
                },
            }])?;
        }
        Ok(())
    }
}

/// A digest of the freeze state a step runs under (frontier, probe,
/// learning-rate factors): the ranks of a data-parallel run compare it.
pub(super) fn state_digest(s: &simfreeze_runtime::contract::FreezeState) -> u64 {
    let mut h = Fnv::default();
    h.write(&s.frontier.to_le_bytes());
    h.write(&s.probe.map_or(u32::MAX, |p| p).to_le_bytes());
    for f in &s.lr_factors {
        h.write(&f.to_bits().to_le_bytes());
    }
    h.write(&s.observe.to_le_bytes());
    h.0
}

/// A policy failure ends the run as a typed stop; any other error (I/O)
/// propagates.
pub(super) fn policy_failure(e: anyhow::Error) -> Result<EpochEnd> {
    match e.downcast::<DriverError>() {
        Ok(d) => Ok(EpochEnd::Stopped(Stop::Policy(d))),
        Err(e) => Err(e),
    }
}

/// What the policy made of a step.
pub(super) enum Decided {
    /// Its decision, applied.
    Outcome(StepOutcome),
    /// It failed (an error, a panic, a broken contract): the run stops.
    PolicyFailed(anyhow::Error),
}
