"""Datasets as webdataset tar shards: write, verify, stream (`data.format=webdataset`).

Modules, one concept each: `writer` (`write_shards`), `manifest` (the format, `ShardSet`
and verification), `reader` (the webdataset pipelines and their named records `StoredChunk`
and `Chunk`), `batches` (`ShardSplit`, `ShardBatches`, `load_shards`). This package
re-exports the names the rest of moe_dist, the tests and the benchmarks import from
``moe_dist.data.shards``.

A shard folder, written by ``moe-dist data shards NAME --out DIR --shard-size N
--chunk-size K``, holds ``train-000000.tar ...``, ``test-000000.tar ...`` (samples in split
order, N per shard) and ``manifest.json``: format version 2, the dataset's name, classes,
input shape and dtype, the chunk size K, the normalisation constants that rebuild the
in-memory inputs, and per shard its file, first index, sample count, chunk count, byte count
and sha256. A tar member is a *chunk* of up to K consecutive samples of one shard (chunks
start every K samples from the shard's first; the shard's last one may be shorter),
``%08d.chunk.npy`` (the key is the split index of its first sample): a .npy record array
with the fields ``input`` (the image as uint8 [C, H, W], exactly as in the source files;
synthetic data: the float32 [200] input), ``label``, ``index`` and, for synthetic data,
``cluster`` (int64). Per-sample tar members (format version 1) made tar parsing, decoding
and per-sample shuffling the cost of reading (about 4,000 samples/s); a chunk is parsed,
checked and copied with one vectorised operation per field. Normalising a stored image
gives bit for bit the tensor `load_dataset` gives. A version-1 folder is refused with a
one-line message to rewrite it.

Reading (docs/design.md, "Environment facts": shards that split unevenly over ranks give ranks
different batch counts, which hangs data-parallel training):

* Training (`ShardBatches`): every rank streams from *resampled* shards
  (`webdataset.ResampledShards`) and takes exactly ceil(N / global batch) batches per epoch,
  its share of each global batch sized as `TensorBatches` sizes it, so ranks stay in step
  whatever the shard count. Node and worker splitting of a random stream: each (rank,
  DataLoader worker) draws shards and shuffles from its own seed, a function of (run seed,
  epoch, rank, worker), so the stream is deterministic and no two readers repeat each
  other. Each reader shuffles in two stages: the chunks of the shards it draws in a buffer
  of CHUNK_SHUFFLE chunks (`webdataset.shuffle`; 64 chunks of 256 samples are 16,384
  samples, more than a shard of 10,000), then the samples of those chunks in a buffer of
  max(SAMPLE_SHUFFLE, 8 K) samples, from which each block of BLOCK samples it hands on is
  drawn uniformly with one random permutation (`_mixed`). A batch thus holds samples of
  many chunks and, once the reader has passed its first shard, of several shards. The
  training process assembles the batches from the readers' blocks.
  N counts the samples of the shards that pass verification; ranks that disagree on it
  (node-local copies, one damaged) all stop with an error rather than fall out of step.
* Exact passes (`read_split`): the shard list split by rank (the rule of
  `webdataset.split_by_node`, with the rank passed explicitly), then by worker
  (`webdataset.split_by_worker`), each shard read once: every sample exactly once across
  ranks and workers. Evaluation reads the test shards this way into memory once and batches
  them with `TensorBatches`, so metrics stay exact (docs/papers.md A.7) and equal the memory
  path's; the training split is materialised the same way only when the whole-set
  evaluation (or a synthetic cluster table) needs it.
* Corruption: every shard is checked against the manifest (size, sha256) when a split is
  opened and again each time it is read; the bytes hashed are the bytes parsed. A shard
  that fails is skipped with a `ShardWarning` naming the file and counting the shards and
  samples skipped; tar or decoding errors that still occur skip the chunk with a counted
  warning too, a chunk must sit where the chunk size puts it and hold the indices its key
  promises (never twice), and a shard read to its end must yield its manifest's sample
  count (tarfile ends an archive quietly at a truncated header). Training streams draw a
  bounded number of shards, so a stream that runs dry is an error, never a hang.

`webdataset` is imported only in this package and only when shards are written or read
(extra ``moe_dist[webdataset]``).
"""

from moe_dist.data.shards.batches import ShardBatches, ShardSplit, load_shards
from moe_dist.data.shards.manifest import (DEFAULT_CHUNK_SIZE, FORMAT, MANIFEST_NAME, SPLITS, VERSION, ShardInfo,
                                           ShardSet, ShardWarning)
from moe_dist.data.shards.reader import (BLOCK, CHUNK_SHUFFLE, SAMPLE_SHUFFLE, Chunk, StoredChunk, read_split,
                                         training_stream)
from moe_dist.data.shards.writer import write_shards

# Internals the tests reach as `moe_dist.data.shards.NAME`. _SKIPPED is the very dict the
# readers count in, so a test that patches it here patches theirs.
from moe_dist.data.shards.manifest import _SKIPPED  # noqa: F401
from moe_dist.data.shards.reader import _mixed, _Normalize, _shuffled_chunks  # noqa: F401

__all__ = [
    "BLOCK", "CHUNK_SHUFFLE", "DEFAULT_CHUNK_SIZE", "FORMAT", "MANIFEST_NAME", "SAMPLE_SHUFFLE", "SPLITS", "VERSION",
    "Chunk", "ShardBatches", "ShardInfo", "ShardSet", "ShardSplit", "ShardWarning", "StoredChunk",
    "load_shards", "read_split", "training_stream", "write_shards",
]
