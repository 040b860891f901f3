-- Every priced row carries the currency of the prices it was priced at (ISO 4217, from the Pricing
-- lists). A tenant list in another currency than the platform's is refused by the operator and
-- dead-lettered by the worker, so one tenant's rows never mix currencies. Rows written before this
-- migration have ''.
ALTER TABLE usage_logs ADD COLUMN currency String DEFAULT ''
