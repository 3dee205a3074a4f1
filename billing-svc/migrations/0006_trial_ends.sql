-- Free trials end (contract part two, section 4): `end_time` is set on every free trial
-- (`create_time` + --free-trial-period; trials bought before this migration get theirs when
-- billing-svc starts, from the period it is given), NULL on other subscriptions. State 3 is
-- EXPIRED, recorded by a task once the end has come; reads show it from `end_time` on.
ALTER TABLE subscriptions ADD COLUMN end_time BIGINT;
