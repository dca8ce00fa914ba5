"""The on-disk contracts between stages, a leaf every stage imports: tar shards and their index files
(``shards``), label indexes (``labels``), the vocabulary file (``vocab``), checkpoints (``checkpoint``), and the one
atomic writer and cache folder (``files``)."""
