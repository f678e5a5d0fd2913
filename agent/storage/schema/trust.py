"""Schema of the trust component: trusted keys, signed releases (content-addressed), version floors,
the precompiled-code cache, and small persisted facts (generation counter, trusted time).

Contracts other components rely on (add columns only by new migrations):
- ``releases`` (kind, name, version, sha256, state, signer_key_id, predicate JSON, times) — read by
  ``status``, the policy/module registries and the fleet hot-swap logic.
- ``trust_state`` key ``generation`` changes on every activation/rollback: a cheap poll target.
- ``release_floors`` never loses a row and never goes down (rollback attacks).
"""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE trust_keys (
        key_id TEXT PRIMARY KEY,
        key_type TEXT NOT NULL,
        public_pem TEXT NOT NULL,
        kinds TEXT NOT NULL DEFAULT '[]',
        names TEXT NOT NULL DEFAULT '*',
        role TEXT NOT NULL DEFAULT 'release' CHECK (role IN ('release', 'root')),
        source TEXT NOT NULL DEFAULT 'local',
        added_at REAL NOT NULL,
        comment TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE trust_revoked (
        key_id TEXT PRIMARY KEY,
        revoked_at REAL NOT NULL,
        keyset_sequence INTEGER NOT NULL
    );
    CREATE TABLE trust_state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE release_artifacts (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('staged', 'active', 'previous', 'retired')),
        signer_key_id TEXT NOT NULL,
        predicate TEXT NOT NULL,
        bundle BLOB NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        installed_at REAL NOT NULL,
        activated_at REAL,
        retired_at REAL,
        UNIQUE (kind, name, version)
    );
    CREATE UNIQUE INDEX releases_one_active ON releases (kind, name) WHERE state = 'active';
    CREATE UNIQUE INDEX releases_one_previous ON releases (kind, name) WHERE state = 'previous';
    CREATE INDEX releases_sha ON releases (sha256);
    CREATE TABLE release_floors (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TRIGGER release_floors_never_lower BEFORE UPDATE OF version ON release_floors
    WHEN NEW.version < OLD.version
    BEGIN SELECT RAISE(ABORT, 'a release version floor can never go down'); END;
    CREATE TRIGGER release_floors_never_deleted BEFORE DELETE ON release_floors
    BEGIN SELECT RAISE(ABORT, 'a release version floor can never be deleted'); END;
    CREATE TABLE code_cache (
        sha256 TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        code BLOB NOT NULL,
        mac TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (sha256, fingerprint)
    );
    """,
]
