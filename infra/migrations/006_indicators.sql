-- 006: program indicators (issue 6): what indicator_values needs beyond 002 for the API, the public
-- page and the open-data downloads. `indicator_id` is the series: `<id>` or `<id>.<category>` (breakdown).
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS base_id     text COLLATE "C";
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS category    text;
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS period_end  timestamptz;
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS n_persons   integer;      -- NULL when suppressed / not personal
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS standing    text
    CHECK (standing IS NULL OR standing IN ('on_track', 'at_risk', 'off_track'));
ALTER TABLE indicator_values ADD COLUMN IF NOT EXISTS unit        text;
-- a suppressed (small) cell never carries its value or its parts
ALTER TABLE indicator_values DROP CONSTRAINT IF EXISTS indicator_values_suppressed_empty;
ALTER TABLE indicator_values ADD CONSTRAINT indicator_values_suppressed_empty
    CHECK (NOT suppressed OR (value IS NULL AND numerator IS NULL AND denominator IS NULL AND n_persons IS NULL));
CREATE INDEX IF NOT EXISTS indicator_values_base_period ON indicator_values (base_id, period_start DESC);
