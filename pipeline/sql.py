"""SQL over a tags output directory: DuckDB views of its current state (docs/sql.md).

    con = pipeline.sql.connect("runs/tags")
    con.sql("SELECT video_id, score FROM video_tags WHERE label = 'dog' AND score > 0.8")

Views (re-read on every query, so they follow new runs and compactions):
- `tag_rows`: every row of every part file (`part-*.parquet`; hidden temporary files are never
  matched), columns united by name, so part files written before a column existed read NULL;
- `tags_current`: one row per video, the one with the greatest run_id: the same state as
  `pipeline.parquet_io.read_tags`;
- `video_tags(video_id, label, score, run_id)`: the current tags (score >= the run's threshold),
  one row per (video, label).
- `segment_tags(video_id, segment, start_s, end_s, label, score, run_id)`: the current tags of
  each window of videos tagged with `tag.segment_s` (segment: its index from 0), one row per
  (video, window, label): where in a video a label holds.
Table macros:
- `tags_as_of(r)`: the state after run `r`: per video, its row with the greatest run_id <= r;
- `new_tags_since(r)`: (video_id, label, score, run_id) for every current tag of a video whose
  current row is newer than `r` and whose state as of `r` lacked that label (all its tags when
  the video had no row then).
Both macros see only stored rows: a compaction drops superseded rows, after which a video whose
row as of `r` was superseded reads as having had no row then (docs/sql.md).
Local directories only; DuckDB is a test dependency (`pip install duckdb`).
"""

from __future__ import annotations

import os

from ovml_core.config import ConfigError
from pipeline.manifest import uri_scheme
from pipeline.parquet_io import PART_PREFIX, PART_SUFFIX

_GLOB_CHARS = "*?[]{}"

VIEWS_SQL = """
CREATE OR REPLACE VIEW tag_rows AS
    SELECT * FROM read_parquet('{pattern}', union_by_name = true);
CREATE OR REPLACE VIEW tags_current AS
    SELECT * FROM tag_rows
    QUALIFY row_number() OVER (PARTITION BY video_id ORDER BY run_id DESC) = 1;
CREATE OR REPLACE VIEW video_tags AS
    SELECT video_id, tag.label AS label, tag.score AS score, run_id
    FROM (SELECT video_id, run_id, unnest(tags) AS tag FROM tags_current);
CREATE OR REPLACE VIEW segment_tags AS
    SELECT video_id, segment, seg.start_s AS start_s, seg.end_s AS end_s,
           tag.label AS label, tag.score AS score, run_id
    FROM (
        SELECT video_id, run_id, segment, seg, unnest(seg.tags) AS tag
        FROM (
            SELECT video_id, run_id, unnest(range(len(segments))) AS segment,
                   unnest(segments) AS seg
            FROM tags_current WHERE segments IS NOT NULL));
CREATE OR REPLACE MACRO tags_as_of(r) AS TABLE
    SELECT * FROM tag_rows WHERE run_id <= r
    QUALIFY row_number() OVER (PARTITION BY video_id ORDER BY run_id DESC) = 1;
CREATE OR REPLACE MACRO new_tags_since(r) AS TABLE
    SELECT now.video_id, now.label, now.score, now.run_id
    FROM video_tags AS now
    WHERE now.run_id > r
      AND NOT EXISTS (
          SELECT 1 FROM (SELECT video_id, unnest(tags).label AS label FROM tags_as_of(r)) AS old
          WHERE old.video_id = now.video_id AND old.label = now.label);
"""


def views_sql(out: str) -> str:
    """The statements that define the views over the local output directory `out`."""
    if uri_scheme(out) != "file":
        raise ConfigError(f"--tags {out}: the SQL views read local directories only")
    directory = os.path.abspath(out.removeprefix("file://"))
    if any(c in directory for c in _GLOB_CHARS):
        raise ConfigError(f"--tags {out}: a path with glob characters ({_GLOB_CHARS}) is refused")
    if not os.path.isdir(directory) or not any(
        n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX) for n in os.listdir(directory)
    ):
        raise ConfigError(f"--tags {out}: no part files there")
    pattern = os.path.join(directory, f"{PART_PREFIX}*{PART_SUFFIX}").replace("'", "''")
    return VIEWS_SQL.format(pattern=pattern)


def connect(out: str, database: str = ":memory:"):
    """A DuckDB connection with the views and macros above over `out`."""
    import duckdb  # a test / analysis dependency, not needed by the pipeline

    con = duckdb.connect(database)
    con.execute(views_sql(out))
    return con
