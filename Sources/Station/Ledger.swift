import ControlProtocol
import Foundation
import GRDB

/// The station's memory (DESIGN.md §8): every job and every state change is a row, written
/// before it is announced, so `status` never claims what the ledger does not hold and a
/// daemon killed mid-write knows, when it comes back, which card to flag for rewriting.
///
/// GRDB runs each access on its own serial queue, off Swift's cooperative pool.
public final class Ledger: Sendable {
    /// Internal, not private: Ledger+Cards.swift reads and writes it too.
    let db: DatabaseQueue
    public let path: String
    /// The lab's shared ledger this one feeds (issue 18); nil for a station's own SQLite ledger.
    public let shared: SharedLedger?
    /// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`), stored with every job.
    /// A disk sequence number is unique within one boot only: the kernel counts from zero at
    /// each boot, so after a reboot the first card in a reader gets the same device number and
    /// disk sequence that an earlier boot's card had. Only a job of this boot is "this media".
    public let boot: String

    /// A station's ledger: `path` alone is the whole ledger; with `lab`, `path` is the
    /// station's own copy and outbox, replayed into the lab's PostgreSQL database as `station`.
    public init(path: String, lab: LabLedgerConfig? = nil, station: String = "", boot: String = Ledger.currentBoot()) throws {
        self.path = path
        self.boot = boot
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        var config = Configuration()
        config.busyMode = .timeout(5)
        let queue = try DatabaseQueue(path: path, configuration: config)
        try queue.writeWithoutTransaction { db in
            // WAL: readers (status) never wait for the writer; NORMAL is durable across a
            // daemon crash, which is the failure this ledger is for.
            try db.execute(sql: "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL")
        }
        try Self.migrator.migrate(queue)
        if let lab {
            try Self.enableOutbox(queue)
            shared = SharedLedger(config: lab, station: station, local: queue)
        } else {
            shared = nil
        }
        db = queue
    }

    private static var migrator: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1") { db in
            try db.create(table: "job") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("kind", .text).notNull()
                t.column("slot", .text)
                t.column("device", .text).notNull()
                t.column("deviceNumber", .integer)
                t.column("diskSequence", .integer)
                t.column("serial", .text)
                t.column("unit", .text)
                t.column("profile", .text)
                t.column("image", .text)
                t.column("state", .text).notNull()
                t.column("message", .text)
                t.column("bytesTotal", .integer)
                t.column("created", .datetime).notNull()
                t.column("updated", .datetime).notNull()
            }
            try db.create(index: "job_state", on: "job", columns: ["state"])
            try db.create(index: "job_media", on: "job", columns: ["deviceNumber", "diskSequence"])
            try db.create(table: "jobEvent") { t in
                t.autoIncrementedPrimaryKey("id")
                t.belongsTo("job").notNull()
                t.column("state", .text).notNull()
                t.column("message", .text)
                t.column("at", .datetime).notNull()
            }
            // Which accounts each unit got: name, uid and hash — never a plaintext password.
            try db.create(table: "jobUser") { t in
                t.belongsTo("job").notNull()
                t.column("name", .text).notNull()
                t.column("uid", .integer).notNull()
                t.column("hash", .text).notNull()
            }
        }
        // Where each generated password went (issue 15): the export file's path, never the password.
        m.registerMigration("v2-password-export") { db in
            try db.alter(table: "jobUser") { t in t.add(column: "passwordExport", .text) }
        }
        // Issue 16: cards remembered (Ledger+Cards.swift).
        m.registerMigration("v3-cards") { db in try createCardTables(db) }
        // Each written card's slow-card note reads the 20 cards seen last: without an index
        // that sorted the whole card table, which grows with every card a station writes.
        m.registerMigration("v4-card-last-seen") { db in
            try db.create(index: "card_lastSeen", on: "card", columns: ["lastSeen"])
        }
        // A job's boot (see `boot`). Jobs from before this migration have none and are of no
        // boot: a card one of them wrote is written again if it comes back, the safe side.
        m.registerMigration("v5-job-boot") { db in
            try db.alter(table: "job") { t in t.add(column: "boot", .text) }
            try db.drop(index: "job_media")
            try db.create(index: "job_media", on: "job", columns: ["deviceNumber", "diskSequence", "boot"])
        }
        return m
    }

    /// This boot's id, or "" when `/proc/sys/kernel/random/boot_id` cannot be read (then no
    /// job matches an earlier one: cards are written again after a restart, the safe side).
    public static func currentBoot() -> String {
        guard let text = try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8) else { return "" }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    public struct NewJob: Sendable {
        public var kind: String
        public var slot: String?
        public var device: String
        public var deviceNumber: UInt64?
        public var diskSequence: UInt64?
        public var serial: String?
        public var unit: String?
        public var profile: String?
        public var image: String?
        public init(kind: String, slot: String?, device: String, deviceNumber: UInt64?, diskSequence: UInt64?, serial: String?, unit: String?, profile: String?, image: String?) {
            self.kind = kind; self.slot = slot; self.device = device; self.deviceNumber = deviceNumber; self.diskSequence = diskSequence
            self.serial = serial; self.unit = unit; self.profile = profile; self.image = image
        }
    }

    /// `date` as GRDB stores a `Date` ("yyyy-MM-dd HH:mm:ss.SSS" in UTC, to the nearest
    /// millisecond) and reads it back, written without GRDB's `DateFormatter`: ICU's
    /// formatting was most of a state change's cost in the ledger, and a card makes five or
    /// six (issue 18: 32 cards). Years before 1600 (ICU's calendar is Julian before 1582) or
    /// after 9999 go to GRDB's formatter.
    static func stored(_ date: Date) -> String {
        // The milliseconds since 1970, as Foundation hands ICU a date (half a millisecond up).
        let ms = ((date.timeIntervalSinceReferenceDate + 978_307_200) * 1000 + 0.5).rounded(.down)
        guard ms.isFinite, abs(ms) < 2.5e14 else { return String.fromDatabaseValue(date.databaseValue) ?? "" }
        let whole = Int64(ms)
        var t = time_t(whole >= 0 ? whole / 1000 : (whole - 999) / 1000)
        let millis = Int(whole - Int64(t) * 1000)
        var tm = tm()
        guard gmtime_r(&t, &tm) != nil, (1600...9999).contains(Int(tm.tm_year) + 1900) else {
            return String.fromDatabaseValue(date.databaseValue) ?? ""
        }
        var text: [UInt8] = []
        text.reserveCapacity(23)
        func field(_ separator: Unicode.Scalar?, _ value: Int, digits: Int) {
            if let separator { text.append(UInt8(ascii: separator)) }
            LineCodec.appendDigits(value, count: digits, to: &text)
        }
        field(nil, Int(tm.tm_year) + 1900, digits: 4)
        field("-", Int(tm.tm_mon) + 1, digits: 2)
        field("-", Int(tm.tm_mday), digits: 2)
        field(" ", Int(tm.tm_hour), digits: 2)
        field(":", Int(tm.tm_min), digits: 2)
        field(":", Int(tm.tm_sec), digits: 2)
        field(".", millis, digits: 3)
        return String(decoding: text, as: UTF8.self)
    }

    /// Records a new job in state `queued` and returns it.
    public func insert(_ job: NewJob, at now: Date = Date()) async throws -> JobRecord {
        let stamp = Self.stored(now)
        return try await db.write { db in
            try db.cachedStatement(sql: """
                INSERT INTO job (kind, slot, device, deviceNumber, diskSequence, boot, serial, unit, profile, image, state, created, updated)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)
                """).execute(arguments: [job.kind, job.slot, job.device, job.deviceNumber.map { Int64(bitPattern: $0) }, job.diskSequence.map { Int64(bitPattern: $0) },
                                 boot, job.serial, job.unit, job.profile, job.image, stamp, stamp])
            let id = db.lastInsertedRowID
            try db.cachedStatement(sql: "INSERT INTO jobEvent (jobId, state, at) VALUES (?, 'queued', ?)").execute(arguments: [id, stamp])
            return JobRecord(id: id, kind: job.kind, slot: job.slot, device: job.device, serial: job.serial, unit: job.unit,
                             profile: job.profile, image: job.image, state: .queued, created: now, updated: now)
        }
    }

    /// Records a state change (and its message) for a job.
    public func record(job id: Int64, state: JobState, message: String?, unit: String? = nil, bytesTotal: UInt64? = nil, at now: Date = Date()) async throws {
        // Cached statements: every job writes five or six of these pairs; the SQL is compiled
        // once per connection, not at every state change of every card (issue 18: 32 cards).
        let stamp = Self.stored(now)
        try await db.write { db in
            try db.cachedStatement(sql: "UPDATE job SET state = ?, message = ?, updated = ?, unit = COALESCE(?, unit), bytesTotal = COALESCE(?, bytesTotal) WHERE id = ?")
                .execute(arguments: [state.rawValue, message, stamp, unit, bytesTotal.map { Int64(bitPattern: $0) }, id])
            try db.cachedStatement(sql: "INSERT INTO jobEvent (jobId, state, message, at) VALUES (?, ?, ?, ?)")
                .execute(arguments: [id, state.rawValue, message, stamp])
        }
    }

    public func recordUsers(job id: Int64, users: [(name: String, uid: Int, hash: String)]) async throws {
        try await db.write { db in
            for u in users {
                try db.execute(sql: "INSERT INTO jobUser (jobId, name, uid, hash) VALUES (?, ?, ?, ?)", arguments: [id, u.name, u.uid, u.hash])
            }
        }
    }

    /// `recordUsers`, with the file each generated password was appended to (never the
    /// password), so `provision jobs` can say later where it went.
    public func recordUsers(job id: Int64, users: [(name: String, uid: Int, hash: String, passwordExport: String?)]) async throws {
        try await db.write { db in
            for u in users {
                try db.execute(sql: "INSERT INTO jobUser (jobId, name, uid, hash, passwordExport) VALUES (?, ?, ?, ?, ?)",
                               arguments: [id, u.name, u.uid, u.hash, u.passwordExport])
            }
        }
    }

    /// At start-up: jobs that were running when the daemon died are marked interrupted.
    @discardableResult
    public func markInterrupted(at now: Date = Date()) async throws -> [JobRecord] {
        try await db.write { db in
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM job WHERE state NOT IN (\(JobState.finalSQLList))")
            let message = "interrupted — rewrite card (provisiond stopped while this job ran)"
            for row in rows {
                let id: Int64 = row["id"]
                try db.execute(sql: "UPDATE job SET state = 'interrupted', message = ?, updated = ? WHERE id = ?", arguments: [message, now, id])
                try db.execute(sql: "INSERT INTO jobEvent (jobId, state, message, at) VALUES (?, 'interrupted', ?, ?)", arguments: [id, message, now])
            }
            return rows.map { row in
                var r = Self.record(row)
                r.state = .interrupted
                r.message = message
                return r
            }
        }
    }

    public struct Filter: Sendable {
        public var state: String?
        public var slot: String?
        public var device: String?
        public var limit: Int
        public init(state: String? = nil, slot: String? = nil, device: String? = nil, limit: Int = 50) {
            self.state = state; self.slot = slot; self.device = device; self.limit = limit
        }
    }

    /// Job history, newest first.
    public func jobs(_ filter: Filter = Filter()) async throws -> [JobRecord] {
        try await db.read { db in
            var clauses: [String] = []
            var args: [(any DatabaseValueConvertible)?] = []
            if let s = filter.state { clauses.append("state = ?"); args.append(s) }
            if let s = filter.slot { clauses.append("slot = ?"); args.append(s) }
            if let d = filter.device { clauses.append("device = ?"); args.append(d) }
            let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
            args.append(max(1, min(filter.limit, 10_000)))
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM job \(whereSQL) ORDER BY id DESC LIMIT ?", arguments: StatementArguments(args))
            var records = rows.map(Self.record)
            for i in records.indices {
                let users = try Row.fetchAll(db, sql: "SELECT name, uid, passwordExport FROM jobUser WHERE jobId = ?", arguments: [records[i].id])
                if !users.isEmpty { records[i].users = users.map { UnitAccount(name: $0["name"], uid: $0["uid"], passwordExport: $0["passwordExport"]) } }
            }
            return records
        }
    }

    /// The last job written to this piece of media in this boot (same node number, disk
    /// sequence and `boot`), so that a `change` event or a daemon restart does not rewrite a
    /// finished card, and a reboot does not take a new card for an old one.
    public func lastJob(deviceNumber: UInt64, diskSequence: UInt64) async throws -> JobRecord? {
        guard !boot.isEmpty else { return nil }
        return try await db.read { [boot] db in
            try Row.fetchOne(db.cachedStatement(sql: "SELECT * FROM job WHERE deviceNumber = ? AND diskSequence = ? AND boot = ? ORDER BY id DESC LIMIT 1"),
                             arguments: [Int64(bitPattern: deviceNumber), Int64(bitPattern: diskSequence), boot]).map(Self.record)
        }
    }

    public func events(job id: Int64) async throws -> [(state: JobState, message: String?, at: Date)] {
        try await db.read { db in
            try Row.fetchAll(db, sql: "SELECT state, message, at FROM jobEvent WHERE jobId = ? ORDER BY id", arguments: [id]).map {
                (JobState(rawValue: $0["state"]) ?? .failed, $0["message"], $0["at"])
            }
        }
    }

    public func users(job id: Int64) async throws -> [(name: String, uid: Int, hash: String)] {
        try await db.read { db in
            try Row.fetchAll(db, sql: "SELECT name, uid, hash FROM jobUser WHERE jobId = ?", arguments: [id]).map { ($0["name"], $0["uid"], $0["hash"]) }
        }
    }

    private static func record(_ row: Row) -> JobRecord {
        return JobRecord(id: row["id"], kind: row["kind"], slot: row["slot"], device: row["device"], serial: row["serial"], unit: row["unit"],
                         profile: row["profile"], image: row["image"], state: JobState(rawValue: row["state"]) ?? .failed,
                         progress: nil,
                         message: row["message"], created: row["created"], updated: row["updated"])
    }
}
