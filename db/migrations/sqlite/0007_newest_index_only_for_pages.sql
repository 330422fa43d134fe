-- PostgreSQL's 0007 makes its newest-first ledger index partial, so key
-- lookups can only use the unique index. SQLite's planner already takes a
-- unique index whose every column is bound by `=` (checked with EXPLAIN
-- QUERY PLAN), so nothing changes here. The file keeps both backends'
-- migration lists in step.
SELECT 1;
