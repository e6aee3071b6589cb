"""The on-disk format: what OUT holds and how it changes.

- `layout`     — every name and path in OUT, the format version
- `manifest`   — the typed manifest, `crowstream.json`
- `records`    — commit records, `committed(out)` / `readable(out)`
- `statistics` — per-module statistics and their per-shard files
- `recovery`   — preparing OUT: inspect, create, recover before a resume
- `locks`      — the directory and rank locks
- `card`       — the dataset card
- `files`      — atomic, durable small files and hashing
- `storage`    — OUT on object storage: URLs, reading a bucket OUT
- `mirror`     — writing one: a local spool published shard by shard (`Mirror`)
- `integrity`  — `verify`; `reencode` — `rewrite`
"""
