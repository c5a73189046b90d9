import ControlProtocol
import Foundation
import GRDB

/// Cards remembered (issue 16): each card the station identified, its last verdict, its
/// repairs and measured write speed. A card found counterfeit or failing is refused on
/// sight, with the date and reason, until an admin forgets it (`provision cards forget ID`).
extension Ledger {
    public typealias CardRecord = CardSummary

    static func createCardTables(_ db: Database) throws {
        try db.create(table: "card") { t in
            t.primaryKey("id", .text)
            t.column("strength", .text).notNull()
            t.column("detail", .text).notNull()
            t.column("verdict", .text).notNull()
            t.column("reason", .text)
            t.column("lastJob", .integer)
            t.column("firstSeen", .datetime).notNull()
            t.column("lastSeen", .datetime).notNull()
            t.column("repairs", .integer).notNull().defaults(to: 0)
            t.column("writeBytesPerSecond", .double)
        }
    }

    /// Records what a job found out about a card. A refusing verdict is never overwritten by
    /// a later good one (the card is refused before it could get one); only `forgetCard` ends it.
    public func rememberCard(id: String, strength: String, detail: String, verdict: String, reason: String?, job: Int64?,
                             repairs: Int = 0, writeBytesPerSecond: Double? = nil, at now: Date = Date()) async throws {
        let stamp = Self.stored(now)
        try await db.write { db in
            try db.cachedStatement(sql: """
                INSERT INTO card (id, strength, detail, verdict, reason, lastJob, firstSeen, lastSeen, repairs, writeBytesPerSecond)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET
                  verdict = CASE WHEN card.verdict IN ('counterfeit', 'failing') AND excluded.verdict IN ('good', 'repaired')
                                 THEN card.verdict ELSE excluded.verdict END,
                  reason = CASE WHEN card.verdict IN ('counterfeit', 'failing') AND excluded.verdict IN ('good', 'repaired')
                                THEN card.reason ELSE excluded.reason END,
                  detail = excluded.detail, lastJob = excluded.lastJob, lastSeen = excluded.lastSeen,
                  repairs = card.repairs + excluded.repairs,
                  writeBytesPerSecond = COALESCE(excluded.writeBytesPerSecond, card.writeBytesPerSecond)
                """).execute(arguments: [id, strength, detail, verdict, reason, job, stamp, stamp, repairs, writeBytesPerSecond])
        }
    }

    /// The refusal for a card found counterfeit or failing, with the date and reason; nil for
    /// any other card. Synchronous: asked from a card's pipeline thread, never from the pool.
    public func cardRefusal(id: String) throws -> String? {
        try db.read { db in
            guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT verdict, reason, lastSeen, lastJob FROM card WHERE id = ? AND verdict IN ('counterfeit', 'failing')"), arguments: [id]) else { return nil }
            let verdict: String = row["verdict"]
            let reason: String? = row["reason"]
            let at: Date = row["lastSeen"]
            let job: Int64? = row["lastJob"]
            let day = ISO8601DateFormatter.string(from: at, timeZone: TimeZone(identifier: "UTC")!, formatOptions: [.withInternetDateTime])
            return "refusing card \(id): found \(verdict) on \(day)\(job.map { " (job \($0))" } ?? "")\(reason.map { ": " + $0 } ?? ""); "
                + "an admin can clear it with `provision cards forget \(id)`"
        }
    }

    /// Every remembered card, refused ones first, then the most recently seen.
    public func cards() async throws -> [CardSummary] {
        try await db.read { db in
            try Row.fetchAll(db, sql: """
                SELECT * FROM card ORDER BY verdict IN ('counterfeit', 'failing') DESC, lastSeen DESC
                """).map(Self.card)
        }
    }

    /// A `card` row as the station reports it (and as the shared ledger sends it).
    static func card(_ row: Row) -> CardSummary {
        CardSummary(id: row["id"], strength: row["strength"], detail: row["detail"], verdict: row["verdict"], reason: row["reason"],
                    lastJob: row["lastJob"], firstSeen: row["firstSeen"], lastSeen: row["lastSeen"], repairs: row["repairs"],
                    writeBytesPerSecond: row["writeBytesPerSecond"])
    }

    /// Forgets a card (an admin's decision): it is no longer refused. False when unknown.
    @discardableResult
    public func forgetCard(id: String) async throws -> Bool {
        try await db.write { db in
            try db.execute(sql: "DELETE FROM card WHERE id = ?", arguments: [id])
            return db.changesCount > 0
        }
    }

    /// The write speeds of the other cards most recently written here, newest first: the
    /// peers a card's own speed is compared with.
    public func peerWriteSpeeds(excluding id: String, limit: Int = 20) async throws -> [Double] {
        try await db.read { db in try Double.fetchAll(db.cachedStatement(sql: Self.peerSpeedsSQL), arguments: [id, limit]) }
    }

    /// The cards seen last but one, newest first (read through the `card_lastSeen` index).
    static let peerSpeedsSQL = "SELECT writeBytesPerSecond FROM card WHERE id != ? AND writeBytesPerSecond > 0 ORDER BY lastSeen DESC LIMIT ?"
}
