"""Reading an output: every reader goes through one catalog.

- `catalog`   — `Catalog`: the committed files of each module (local or URL), one vector
                conversion, one paired-read rule
- `readers`   — `load`, `scan`, `vocab`, `docs`, `info`
- `loader`    — `stream`, `Stream`, `stats` (training)
- `analysis`  — `top`, `contexts`; `reporting` — `report`
"""
