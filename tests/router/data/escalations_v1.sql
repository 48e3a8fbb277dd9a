-- The escalation database as schema version 1 created it (kept to test the upgrade).
CREATE TABLE IF NOT EXISTS escalations (
    id                         TEXT PRIMARY KEY,  -- uuid4, hex; the Decision's escalation_id
    created_at                 TEXT NOT NULL,     -- UTC, ISO 8601 with microseconds
    created_epoch              REAL NOT NULL,     -- the same instant, seconds since the epoch
    model                      TEXT NOT NULL,     -- specialist name
    model_version              INTEGER NOT NULL,  -- specialist version that saw the text
    text_sha256                TEXT NOT NULL,     -- hex sha256 of the UTF-8 text, always kept
    text                       TEXT,              -- the text itself; NULL unless store_texts
    specialist_top             TEXT NOT NULL,     -- JSON [[label, score], ...], best first
    specialist_confidence      REAL NOT NULL,     -- the specialist's top-1 score
    threshold                  REAL NOT NULL,     -- the model's cascade threshold at the time
    generalist_label           TEXT NOT NULL,     -- the generalist's answer
    generalist_confidence      REAL NOT NULL,     -- its probability under the label constraint
    generalist_prompt_tokens   INTEGER NOT NULL,
    generalist_completion_tokens INTEGER NOT NULL,
    final_label                TEXT NOT NULL,     -- the label returned to the caller
    route                      TEXT NOT NULL,     -- the route that answered: 'generalist'
    policy                     TEXT NOT NULL,     -- 'cascade' (below threshold) | 'generalist_only'
    cost_core_seconds          REAL NOT NULL,     -- specialist + generalist, both were spent
    cost_accelerator_seconds   REAL NOT NULL,
    price                      REAL NOT NULL,     -- in `currency`, at the box's hourly price
    currency                   TEXT NOT NULL,
    request_id                 TEXT NOT NULL      -- the request that carried the text
);
CREATE INDEX IF NOT EXISTS escalations_by_time ON escalations (created_epoch);
CREATE INDEX IF NOT EXISTS escalations_by_model_time ON escalations (model, created_epoch);

-- Corrected labels for escalated texts, from people or a stronger model: the retraining input.
CREATE TABLE IF NOT EXISTS corrections (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    escalation_id     TEXT NOT NULL REFERENCES escalations (id),
    corrected_label   TEXT NOT NULL,
    source            TEXT NOT NULL,  -- who corrected: 'human:alice', 'review-queue', a model name
    created_at        TEXT NOT NULL,  -- UTC, ISO 8601
    created_epoch     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_by_escalation ON corrections (escalation_id);

-- One row per decision, on every route: what `appliance report` reads.
CREATE TABLE IF NOT EXISTS decisions (
    id                        INTEGER PRIMARY KEY,
    created_epoch             REAL NOT NULL,     -- seconds since the epoch, UTC
    model                     TEXT NOT NULL,
    model_version             INTEGER NOT NULL,
    route                     TEXT NOT NULL,     -- 'specialist' | 'generalist'
    policy                    TEXT NOT NULL,     -- the effective policy
    fallback                  INTEGER NOT NULL,  -- 1: the generalist was needed but absent
    escalation_id             TEXT,              -- escalations.id for generalist answers
    cost_core_seconds         REAL NOT NULL,
    cost_accelerator_seconds  REAL NOT NULL,
    price                     REAL NOT NULL,
    currency                  TEXT NOT NULL,
    latency_ms                REAL NOT NULL,
    request_id                TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (created_epoch);
