"""The capture pipeline: a model + a corpus + module names -> committed shards in OUT.

The stages, in the order data flows (a stage never imports a later one):

- `options`  — `CaptureOptions` (the validated call) and `CaptureConfig` (what decides the rows)
- `run`      — `capture()`: the lifecycle of one run, top to bottom
- `output`   — `Output`: where the run writes (OUT, a bucket's spool, a rank's share)
- `session`  — the batch loop and the run's manifest
- `sources`  -> `batching` -> `models`/`probe`/`tracing` -> `flatten` -> `writers`/`parts` -> `commit`
- `ranks`    — several processes writing one run; `finalize`
- `tables`, `progress`, `failures`, `threads` — the docs/vocab tables, what the user sees,
  error translation, background threads
"""
