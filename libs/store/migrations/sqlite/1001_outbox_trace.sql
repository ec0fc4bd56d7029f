-- The W3C traceparent of the change, so the audit relay's span joins the
-- trace of the call that made it. NULL when the call was not traced.
ALTER TABLE outbox_events ADD COLUMN trace_parent TEXT;
