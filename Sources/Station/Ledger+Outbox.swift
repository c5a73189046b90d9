import Foundation
import GRDB

/// The local half of a shared ledger (issue 18). With `ledger = "postgresql://…"` the station
/// still writes every row to its own SQLite file first — the same code, the same transaction,
/// the same "recorded before announced" — and triggers add a reference to each changed row to
/// an outbox table in that same transaction. `SharedLedger` replays the outbox into PostgreSQL
/// in order. So a station whose database is away keeps writing cards (its rows wait on local
/// disk), and nothing can be in the ledger without being in the outbox, or the reverse.
///
/// The triggers are TEMP (they live on this connection only): a station moved back to a plain
/// SQLite ledger stops feeding an outbox without any migration, and a plain SQLite ledger
/// never has them, so its behaviour and its file are exactly what they were.
extension Ledger {
    static func enableOutbox(_ db: DatabaseQueue) throws {
        try db.writeWithoutTransaction { db in
            try db.execute(sql: """
                CREATE TABLE IF NOT EXISTS labOutbox (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  kind TEXT NOT NULL,          -- job, event, users, card, unit (users: eventId is the jobUser row)
                  jobId INTEGER, eventId INTEGER, cardId TEXT, unitNumber INTEGER);
                -- Lab unit numbers this station reserved from the database's sequence; jobId is
                -- set when a job takes one (each number once: it is the primary key here and there).
                CREATE TABLE IF NOT EXISTS labUnit (number INTEGER PRIMARY KEY, jobId INTEGER UNIQUE, reserved DATETIME NOT NULL);
                -- Entries the shared database refused for what they hold (SharedLedger.setAside),
                -- with its reason: kept, not retried for ever in front of every later entry.
                CREATE TABLE IF NOT EXISTS labOutboxRejected (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, jobId INTEGER, eventId INTEGER,
                  cardId TEXT, unitNumber INTEGER, reason TEXT NOT NULL, at DATETIME NOT NULL);
                -- Who this station's ledger is, so that two stations given the same name are told apart.
                CREATE TABLE IF NOT EXISTS labIdentity (instance TEXT NOT NULL);
                CREATE TEMP TRIGGER IF NOT EXISTS labJobInserted AFTER INSERT ON main.job
                  BEGIN INSERT INTO labOutbox (kind, jobId) VALUES ('job', NEW.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labJobUpdated AFTER UPDATE ON main.job
                  BEGIN INSERT INTO labOutbox (kind, jobId) VALUES ('job', NEW.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labEventInserted AFTER INSERT ON main.jobEvent
                  BEGIN INSERT INTO labOutbox (kind, jobId, eventId) VALUES ('event', NEW.jobId, NEW.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labUserInserted AFTER INSERT ON main.jobUser
                  BEGIN INSERT INTO labOutbox (kind, jobId, eventId) VALUES ('users', NEW.jobId, NEW.rowid); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labCardInserted AFTER INSERT ON main.card
                  BEGIN INSERT INTO labOutbox (kind, cardId) VALUES ('card', NEW.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labCardUpdated AFTER UPDATE ON main.card
                  BEGIN INSERT INTO labOutbox (kind, cardId) VALUES ('card', NEW.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labCardDeleted AFTER DELETE ON main.card
                  BEGIN INSERT INTO labOutbox (kind, cardId) VALUES ('card', OLD.id); END;
                CREATE TEMP TRIGGER IF NOT EXISTS labUnitTaken AFTER UPDATE OF jobId ON main.labUnit
                  BEGIN INSERT INTO labOutbox (kind, jobId, unitNumber) VALUES ('unit', NEW.jobId, NEW.number); END;
                """)
            if try String.fetchOne(db, sql: "SELECT instance FROM labIdentity") == nil {
                try db.execute(sql: "INSERT INTO labIdentity (instance) VALUES (?)", arguments: [UUID().uuidString])
            }
        }
    }

    /// The number a unit's name and inventory line come from. With a SQLite ledger it is the
    /// job's id, as always. With a shared ledger it is a lab-wide number from the station's
    /// reserved block (see `SharedLedger`); asked again for the same job, the same number.
    /// Synchronous: called from a card's pipeline thread before the card is touched.
    public func unitSequence(job id: Int64) throws -> Int64 {
        guard let shared else { return id }
        if let number = try takeUnitNumber(job: id) { return number }
        // The block is used up (or not yet reserved, at the daemon's first start): ask the
        // database for more now; the replicator tops it up ahead otherwise.
        var why: String?
        try shared.reserving.withLock { _ in
            // Another card may have brought a block while this one waited for the lock.
            guard try freeUnitNumbers() == 0 else { return }
            why = blockingAwait { await shared.reserveNow() }
        }
        if let number = try takeUnitNumber(job: id) { return number }
        throw LabUnitUnavailable(message: "no lab unit number for this card: the \(shared.config.unitBlock) numbers this station reserved are used up "
            + "and the shared ledger \(shared.config.display) cannot give more (\(why ?? "unreachable")); nothing was written — "
            + "reinsert the card when the database is back, or raise ledger_unit_block")
    }

    func freeUnitNumbers() throws -> Int {
        try db.read(Self.freeUnitNumbers)
    }

    /// Lab unit numbers this station holds and has not given to a unit yet.
    static func freeUnitNumbers(_ db: Database) throws -> Int {
        try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM labUnit WHERE jobId IS NULL") ?? 0
    }

    /// Outbox entries not yet in the shared database.
    static func outboxPending(_ db: Database) throws -> Int {
        try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM labOutbox") ?? 0
    }

    func takeUnitNumber(job id: Int64) throws -> Int64? {
        try db.write { db in
            if let mine = try Int64.fetchOne(db, sql: "SELECT number FROM labUnit WHERE jobId = ?", arguments: [id]) { return mine }
            guard let free = try Int64.fetchOne(db, sql: "SELECT MIN(number) FROM labUnit WHERE jobId IS NULL") else { return nil }
            try db.execute(sql: "UPDATE labUnit SET jobId = ? WHERE number = ?", arguments: [id, free])
            return free
        }
    }
}

struct LabUnitUnavailable: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
