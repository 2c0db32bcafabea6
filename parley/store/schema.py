"""The store's schema as numbered forward migrations.

`MIGRATIONS[i]` takes a database from version i to version i + 1. Each migration is a tuple
of single statements rather than one script, because `executescript` commits first and would
break the all-or-nothing transaction the store applies them in. Never edit a released
migration; append a new one.
"""

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: users, keys, conversations, memory and documents with full-text search
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
            created_at TEXT NOT NULL)""",
        # only the sha256 of a key is kept: a copied database file grants no access
        """CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            key_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            last_used_at TEXT)""",
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            title TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX conversations_user ON conversations(user_id, updated_at)",
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER)""",
        "CREATE INDEX turns_conversation ON turns(conversation_id, id)",
        """CREATE TABLE traces (
            turn_id INTEGER PRIMARY KEY REFERENCES turns(id) ON DELETE CASCADE,
            data TEXT NOT NULL CHECK (json_valid(data)))""",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            edited_text TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (turn_id, user_id))""",
        """CREATE TABLE memory_facts (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            created_at TEXT NOT NULL,
            embedding BLOB)""",
        "CREATE INDEX memory_user ON memory_facts(user_id)",
        """CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            mime TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL)""",
        "CREATE INDEX documents_user ON documents(user_id)",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            ord INTEGER NOT NULL,
            text TEXT NOT NULL,
            embedding BLOB,
            UNIQUE (document_id, ord))""",
        # external-content FTS: the text lives once, in chunks; triggers keep the index in step
        "CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id')",
        """CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
        END""",
        """CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END""",
        """CREATE TRIGGER chunks_au AFTER UPDATE OF text ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
        END""",
    ),
    (  # 2: knowledge base: collections, the source file and its hash, PDF pages, and a stamp
        # per user that changes with every change to that user's documents, so cached vectors
        # know when they are stale (a random token, not a counter: it never repeats, even
        # across database files or after ids are reused)
        "ALTER TABLE documents ADD COLUMN collection TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE documents ADD COLUMN source TEXT",
        "CREATE INDEX documents_user_collection ON documents(user_id, collection, sha256)",
        "ALTER TABLE chunks ADD COLUMN page INTEGER",
        """CREATE TABLE knowledge_stamps (
            user_id INTEGER PRIMARY KEY,
            stamp TEXT NOT NULL)""",
        """CREATE TRIGGER documents_stamp_ai AFTER INSERT ON documents BEGIN
            INSERT INTO knowledge_stamps (user_id, stamp) VALUES (new.user_id, hex(randomblob(8)))
            ON CONFLICT (user_id) DO UPDATE SET stamp = excluded.stamp;
        END""",
        """CREATE TRIGGER documents_stamp_ad AFTER DELETE ON documents BEGIN
            INSERT INTO knowledge_stamps (user_id, stamp) VALUES (old.user_id, hex(randomblob(8)))
            ON CONFLICT (user_id) DO UPDATE SET stamp = excluded.stamp;
        END""",
        """CREATE TRIGGER chunks_stamp_au AFTER UPDATE ON chunks BEGIN
            INSERT INTO knowledge_stamps (user_id, stamp)
            SELECT user_id, hex(randomblob(8)) FROM documents WHERE id = new.document_id
            ON CONFLICT (user_id) DO UPDATE SET stamp = excluded.stamp;
        END""",
    ),
    (  # 3: conversation ids are never reused (AUTOINCREMENT: a deleted conversation's id, and
        # anything keyed by it, can never come back as someone else's), and the dialogue state
        # (slots carried across turns) per user and conversation, deleted with either. SQLite
        # cannot add AUTOINCREMENT to a table: it is rebuilt, rows and ids kept. The store runs
        # migrations with foreign keys off (see Store._migrate), so dropping the old table
        # cascades nothing, and checks every reference before committing.
        """CREATE TABLE conversations_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            title TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "INSERT INTO conversations_new (id, user_id, title, created_at, updated_at)"
        " SELECT id, user_id, title, created_at, updated_at FROM conversations",
        "DROP TABLE conversations",
        "ALTER TABLE conversations_new RENAME TO conversations",
        "CREATE INDEX conversations_user ON conversations(user_id, updated_at)",
        """CREATE TABLE dialogue_state (
            conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            slots TEXT NOT NULL CHECK (json_valid(slots)),
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX dialogue_state_user ON dialogue_state(user_id)",
    ),
    (  # 4: user ids are never reused either (a deleted user's id, and anything still keyed by it,
        # such as a cache of their vectors, can never come back as a new user's), rebuilt as in 3;
        # and a conversation a turn opens stays `saved = 0` until the turn's exchange is written,
        # so one a crash left empty can be told from any other and dropped at the next start.
        """CREATE TABLE users_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
            created_at TEXT NOT NULL)""",
        "INSERT INTO users_new (id, name, role, created_at) SELECT id, name, role, created_at FROM users",
        "DROP TABLE users",
        "ALTER TABLE users_new RENAME TO users",
        "ALTER TABLE conversations ADD COLUMN saved INTEGER NOT NULL DEFAULT 1",
    ),
    (  # 5: a message can be withdrawn from its conversation (the user regenerated an answer or
        # edited a question: the old rows stay, out of the conversation's history), and feedback
        # has a kind: "rating" (thumbs, corrections) or "regenerated" (an answer the user asked
        # to replace: a rejected alternative to the answer that follows the same question)
        "ALTER TABLE turns ADD COLUMN withdrawn_at TEXT",
        "ALTER TABLE feedback ADD COLUMN kind TEXT NOT NULL DEFAULT 'rating' CHECK (kind IN ('rating', 'regenerated'))",
    ),
    (  # 6: which model (and which import of it) wrote an answer, so a conversation reopened later
        # still says so; NULL for user messages and for answers saved before this version
        "ALTER TABLE turns ADD COLUMN model TEXT",
    ),
    (  # 7: the dialogue state an exchange left, on its answer, so that withdrawing exchanges
        # (regenerate, edit) can put the state back to what the remaining history left
        "ALTER TABLE turns ADD COLUMN slots TEXT CHECK (slots IS NULL OR json_valid(slots))",
    ),
    (  # 8: a user can be marked untrusted: their feedback never becomes training data (parley learn)
        "ALTER TABLE users ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1 CHECK (trusted IN (0, 1))",
    ),
    (  # 9: a user can opt out of personalization: no adapter of their own is trained or served
        # (parley/learn/personal.py)
        "ALTER TABLE users ADD COLUMN personalize INTEGER NOT NULL DEFAULT 1 CHECK (personalize IN (0, 1))",
    ),
    (  # 10: feedback of kind "barge-in": the user spoke over a spoken answer, which stopped it
        # (parley/serve/turns.py). SQLite cannot change a CHECK: the table is rebuilt, rows and ids kept.
        """CREATE TABLE feedback_new (
            id INTEGER PRIMARY KEY,
            turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            edited_text TEXT,
            created_at TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT 'rating' CHECK (kind IN ('rating', 'regenerated', 'barge-in')),
            UNIQUE (turn_id, user_id))""",
        "INSERT INTO feedback_new (id, turn_id, user_id, rating, edited_text, created_at, kind)"
        " SELECT id, turn_id, user_id, rating, edited_text, created_at, kind FROM feedback",
        "DROP TABLE feedback",
        "ALTER TABLE feedback_new RENAME TO feedback",
    ),
]
