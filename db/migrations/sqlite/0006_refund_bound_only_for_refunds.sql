-- PostgreSQL's 0006 gives its refund-bound trigger the WHEN clause this
-- backend's trigger has had since 0004; nothing changes here. The file keeps
-- both backends' migration lists in step.
SELECT 1;
