-- The scheduler records how a job ran: how many jobs shared its denoising run, and whether it
-- was queued with admin priority (kept so that a re-queued job keeps its tier after a restart).
ALTER TABLE jobs ADD COLUMN batch_size INTEGER;
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
