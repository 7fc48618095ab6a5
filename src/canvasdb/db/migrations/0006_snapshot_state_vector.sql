-- A snapshot's Yjs state vector, written by compaction, so that serving a document
-- never has to decode its snapshot to learn what it holds. NULL on older snapshots
-- (read from the snapshot bytes when loaded).
ALTER TABLE doc_snapshots ADD COLUMN state_vector bytea;
