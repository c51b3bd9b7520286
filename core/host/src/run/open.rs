//! Opening a trainer: the engine on its device, the weights or the
//! checkpoint, the observer and its fixed batch, the data kept on the
//! device, the activation cache, the logs.

use super::*;

impl Trainer {
    /// Builds the engine, imports weights or restores the checkpoint, and
    /// opens the run's files.
    pub(super) fn open(
        plan: Plan,
        dir: RunDir,
        start: Option<CheckpointMeta>,
        at: Placement,
    ) -> Result<Trainer> {
        let Plan {
            config,
            model,
            device: _,
            train,
            eval,
            policy,
            weights,
            augment,
        } = plan;
        tch::manual_seed(config.train.seed as i64);
        let (precision, recipe) = (config.train.precision, config.train.recipe());
        // The device this rank claimed when it joined its group.
        let device = at.device;
        let (rank, world) = at.rank_world();
        let writes = rank == 0;
        let mut engine = launch(&model, precision, recipe, &at, &config.train.dist())?;
        if let (Some(ck), None) = (weights, &start) {
            let from = ck.path.display().to_string();
            let report = engine.import_weights(ck, config.model.head)?;
            eprintln!("weights: {from}: {report}");
        }
        let provenance = Provenance::collect(
            config.model.weights.as_deref(),
            device_name(device),
            tch::get_num_threads().into(),
        );
        let mut driver = PolicyDriver::new(policy, engine.model().depth() as u32);
        if config.train.record_observations {
            driver.record_observations();
        }
        if config.train.record_on_demand {
            driver.record_on_demand();
        }
        if start.is_none() && config.train.frozen_from_start > 0 {
            driver.freeze_from_start(config.train.frozen_from_start);
        }
        let declared = driver.needs();
        let probe = probe_batch(&config, &train, world, &driver)?;
        let observer = Observer::new(
            declared,
            &model,
            engine.model(),
            || engine.state_tensors(),
            device,
            probe,
            config.train.seed,
        );
        // Each step takes `train.batch` images on every rank.
        let global_batch = config.train.batch * world as i64;
        let steps_per_epoch = (train.len() / global_batch) as u64;
        let total = steps_per_epoch * config.train.epochs;
        let lengths = start.as_ref().map(|m| LogLengths {
            metrics: m.metrics_len,
            events: m.events_len,
            tensorboard: m.tensorboard_len,
            observations: m.observations_len,
        });
        let log = match writes {
            true => RunLog::open(&dir, lengths, LogFileSet::of(&config.train))?,
            false => RunLog::muted(),
        };
        let mut data = Data::new((train, eval), augment, None, rank);
        if config.train.data_on_device {
            let free = crate::memory::free_mib(device);
            let moved = data.keep_on_device(device, free, !config.train.cache_frozen);
            if writes && !moved.is_empty() {
                eprintln!(
                    "data: {} kept on {}",
                    moved.join(" and "),
                    device_name(device)
                );
            }
        }
        data.cache = activation_cache(&config, &model, data.train.len(), device)?;
        data.drop_unused_bytes(device);
        let mut trainer = Trainer {
            data,
            config,
            engine,
            driver,
            dir,
            log,
            progress: match writes {
                true => Progress::new(total, steps_per_epoch, start.as_ref().map_or(0, |m| m.step)),
                false => Progress::quiet(total, steps_per_epoch),
            },
            totals: Totals {
                world_size: world,
                global_batch,
                ..Totals::default()
            },
            epoch_loss: 0.0,
            carried_seconds: 0.0,
            steps_per_epoch,
            total,
            writes,
            epoch_comm: Comm::default(),
            last_allreduce: None,
            observer,
            writer: checkpoint::Writer::default(),
            provenance,
        };
        match start {
            Some(meta) => trainer.restore(meta)?,
            None => trainer.progress.println(&format!(
                "run {}: {} train / {} eval images, {} steps, policy {}, device {}{}",
                trainer.dir.path.display(),
                trainer.data.train.len(),
                trainer.data.eval.len(),
                total,
                trainer
                    .driver
                    .policy()
                    .map_or("none", |p| p.meta.name.as_str()),
                device_name(device),
                match world {
                    1 => String::new(),
                    w => format!(
                        ", {w} ranks of batch {} (global batch {global_batch})",
                        trainer.config.train.batch
                    ),
                }
            )),
        }
        Ok(trainer)
    }
}

/// The frozen-prefix activation cache for `samples` training samples on
/// `device`, when the run asks for one (`train.cache_frozen`).
pub(super) fn activation_cache(
    config: &RunConfig,
    model: &VitConfig,
    samples: i64,
    device: Device,
) -> Result<Option<PrefixCache>> {
    if !config.train.cache_frozen {
        return Ok(None);
    }
    let cache = torch_guard(
        || "allocating the activation cache".into(),
        || {
            PrefixCache::new(
                samples,
                (model.tokens(), model.dim),
                config.train.precision,
                config.train.cache_max_mib,
                config.data.random_transform(),
                device,
            )
        },
    )??;
    Ok(Some(cache))
}

/// The fixed batch of a policy that declares it: the first global batch's
/// worth of samples of a fixed shuffle of the training set, the same on
/// every rank. A training set not held in memory (an augmented image
/// folder reads its files per batch) has none: such a policy is refused.
pub(super) fn probe_batch(
    config: &RunConfig,
    train: &Dataset,
    world: usize,
    driver: &PolicyDriver,
) -> Result<Option<Tensor>> {
    if !driver.needs().contains(Needs::FIXED_BATCH) {
        return Ok(None);
    }
    if train.images.numel() == 0 {
        return Err(UsageError(format!(
            "policy `{}` asks for the fixed batch (Needs::FIXED_BATCH), which needs a training \
             set held in memory; an augmented image folder reads its files per batch (turn the \
             augmentation off, or use a policy without it)",
            driver.policy().map_or("?", |p| p.meta.name.as_str())
        ))
        .into());
    }
    let n = (config.train.batch * world as i64).min(train.len()).max(0) as usize;
    let order = train.order(config.train.seed ^ PROBE_SEED, 0);
    Ok(Some(
        train
            .images
            .index_select(0, &Tensor::from_slice(&order[..n])),
    ))
}
