"""Segment tags (tag.segment_s): a video's windows as flat clips, and back to one row each.

The encode actors and re-scoring both see a batch of videos as N clips (the windows of every
video, in row order) with `counts[i]` clips for row i (0 for an error row). These helpers turn
the per-clip results back into per-video values and the `segments` column, so fresh tagging and
re-scoring build rows the same way.

The video-level aggregate: probabilities are the max over the video's segments, so a label holds
for a video when it holds in any of its windows (tagging asks "is there a dog in this video";
a mean over segments would dilute a 10-s scene of a two-hour film 720-fold). The video's
`embedding` (for search) is the L2-normalised mean of its stored segment embeddings. A video of
one segment gets exactly that segment's embedding and scores, i.e. what tagging without segments
gives it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def offsets(counts: np.ndarray) -> np.ndarray:
    """int32 [B + 1]: row i's clips are [offsets[i], offsets[i + 1])."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def max_per_video(probabilities: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, L] max over each video's clips of [N, L]; every count >= 1."""
    return np.maximum.reduceat(probabilities, offsets(counts)[:-1], axis=0)


def mean_embedding(embeddings: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, D] float32: the L2-normalised mean of each video's clip embeddings (as stored),
    rounded to float16 as stored; a video of one clip keeps that clip's embedding unchanged."""
    embeddings = np.asarray(embeddings, np.float32)
    mean = np.add.reduceat(embeddings, offsets(counts)[:-1], axis=0) / counts[:, None]
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    pooled = (mean / np.maximum(norm, 1e-12)).astype(np.float16).astype(np.float32)
    single = counts == 1
    pooled[single] = embeddings[offsets(counts)[:-1][single]]
    return pooled


def segments_array(
    counts: np.ndarray,
    bounds: np.ndarray,
    tags: pa.Array,
    top_k: pa.Array,
    embeddings: np.ndarray | None,
    type: pa.DataType,
) -> pa.ListArray:
    """The `segments` column (`type` = parquet_io.segments_type) of B rows from N clips:
    bounds float64 [N, 2], tags / top_k list arrays of N, embeddings [N, D] (or None when the
    type holds none); rows with count 0 (errors) are null."""
    struct = type.value_type
    columns = {
        "start_s": pa.array(bounds[:, 0], pa.float64()),
        "end_s": pa.array(bounds[:, 1], pa.float64()),
        "tags": tags,
        "top_k": top_k,
    }
    if struct.get_field_index("embedding") >= 0:
        dim = struct.field("embedding").type.list_size
        flat = pa.array(np.asarray(embeddings, np.float16).reshape(-1))
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    values = pa.StructArray.from_arrays([columns[f.name] for f in struct], fields=list(struct))
    counts = np.asarray(counts)
    return pa.ListArray.from_arrays(
        pa.array(offsets(counts)), values, type=type, mask=pa.array(counts == 0)
    )


def stored_segments(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(counts [B] (0 for a null row), bounds float64 [N, 2], the N segment structs) of a stored
    `segments` column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    counts = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    values = column.flatten()  # the valid rows' segments, in row order
    bounds = np.stack(
        [
            values.field("start_s").to_numpy(zero_copy_only=False),
            values.field("end_s").to_numpy(zero_copy_only=False),
        ],
        axis=1,
    ).reshape(-1, 2)
    return counts.astype(np.int64), bounds.astype(np.float64), values


def stored_embeddings(values: pa.Array, dim: int) -> np.ndarray:
    """float32 [N, D] of the `embedding` field of N segment structs (stored float16)."""
    flat = values.field("embedding").flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(-1, dim)
