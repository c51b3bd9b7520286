"""Prints every scalar of the TensorBoard event files in a run directory as
JSON {tag: [[step, value], ...]}, read with TensorBoard's own
EventAccumulator (what `tensorboard --logdir` uses)."""
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
print(json.dumps(out))
