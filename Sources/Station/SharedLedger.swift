import ControlProtocol
import Foundation
import GRDB
import Logging
import PostgresNIO
import Synchronization

/// A lab's shared ledger on PostgreSQL (issue 18, DESIGN.md §11): every station of the lab
/// replays its local outbox (Ledger+Outbox.swift) into one database, where every row carries
/// the station's name, and takes its units' numbers from one database sequence.
///
/// Replay is idempotent, keyed by what identifies a row in the lab: (station, local job id)
/// for a job, (station, job, local event id) for a state change, (station, job, user name)
/// for an account, (station, card id) for a card, the number itself for a unit. A row sent
/// twice (the database committed it, then the link broke before the outbox entry was
/// removed) is a no-op the second time; the outbox is replayed in its own order, so a job's
/// row never goes back to an older state.
///
/// Unit numbers while the database is away: a station reserves a block of numbers from the
/// lab's sequence while it can reach the database (`ledger_unit_block`, 32 by default), keeps
/// them in its local file, and tops the block up when half of it is used. A unit takes the
/// smallest number it holds, so two stations can never both take one (the database gave
/// each number to one station, `nextval` never gives it again, and `lab_unit.number` is a
/// primary key besides). The cost: numbers are unique but not dense or in time order across
/// the lab (station A's block may be 1–32 while B writes 33…), and a station that is retired
/// leaves its unused numbers as a gap. Waiting for the database instead would stop a bench
/// for as long as the database is away, which is what the outbox is there to avoid. Only a
/// station that writes a whole block while the database is away runs out; its next card
/// then fails before anything is written, saying why (`Ledger.unitSequence`).
public final class SharedLedger: Sendable {
    public let config: LabLedgerConfig
    public let station: String
    let local: DatabaseQueue
    let logger: Logger
    private let link = Mutex(LinkState())
    /// Cards that find the block empty at the same moment ask the database one at a time
    /// (the first one's block serves the others).
    let reserving = Mutex(())
    /// Made at the first connection over TCP and kept for every later one: a context loads
    /// the system's trust roots, and the replicator reconnects every few seconds while the
    /// database is away.
    private let tlsContext = Mutex<NIOSSLContext?>(nil)

    struct LinkState {
        var connected = false
        var lastError: String?
        var downSince: Date?
    }

    /// The lab's view is read one request at a time, on one connection at a time: a daemon
    /// holds at most that one and the replicator's, however many clients ask. (A connection
    /// per request let 40 looping read-only clients take the lab database's max_connections
    /// from every station's replicator.) A `lab-status` asked while another was read, or
    /// within a second of it, gets that answer: the board asks every 2 s.
    private let labReads = AsyncGate()
    private let labStatusCache = Mutex<(at: ContinuousClock.Instant, status: LabStatus)?>(nil)
    static let labStatusFreshFor = Duration.seconds(1)

    init(config: LabLedgerConfig, station: String, local: DatabaseQueue) {
        self.config = config
        self.station = station
        self.local = local
        var logger = Logger(label: "provisiond.lab")
        logger.logLevel = .info
        self.logger = logger
    }

    /// Outbox entries not yet in the database, and whether the link is up.
    public func outboxState() async -> LabOutbox {
        let counts = try? await local.read { db in (try Ledger.outboxPending(db), try Ledger.freeUnitNumbers(db)) }
        let pending = counts?.0, reserved = counts?.1
        return link.withLock { s in
            LabOutbox(connected: s.connected, pending: pending ?? 0, unitsReserved: reserved ?? 0,
                      lastError: s.lastError, downSince: s.downSince)
        }
    }

    // MARK: - The replicator

    /// Replays the outbox for as long as the daemon runs: connects (again and again while the
    /// database is away, waiting up to 5 s between tries), then sends each entry in order,
    /// keeps the unit block full, and says every few seconds that the station is alive.
    /// Returns when the task is cancelled (the daemon stopping).
    public func run() async {
        var backoff = Duration.milliseconds(250)
        // Stopped, it is no longer connected (its state is read after it, by a station that
        // starts it again).
        defer { link.withLock { $0.connected = false } }
        while !Task.isCancelled {
            do {
                let connection = try await connect()
                backoff = .milliseconds(250)
                do {
                    try await serve(connection)
                } catch {
                    await connection.close()
                    throw error
                }
                await connection.close()
            } catch is CancellationError {
                break
            } catch {
                let message = Self.describe(error)
                let wasUp = link.withLock { s -> Bool in
                    let was = s.connected || s.lastError == nil
                    s.connected = false
                    s.lastError = message
                    if s.downSince == nil { s.downSince = Date() }
                    return was
                }
                if wasUp { logger.warning("shared ledger \(config.display) unreachable: \(message); cards go on, their rows wait in the outbox") }
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    private func serve(_ connection: LabConnection) async throws {
        try await Self.createSchema(connection, logger: logger)
        let instance = try await local.read { db in try String.fetchOne(db, sql: "SELECT instance FROM labIdentity") } ?? ""
        try await register(connection, instance: instance)
        try await reconcileUnits(connection)
        // Numbers in hand and the backlog sent before the link says "connected".
        try await topUpUnits(connection)
        _ = try await drain(connection)
        let downSince = link.withLock { s -> Date? in
            let d = s.downSince
            s.connected = true; s.lastError = nil; s.downSince = nil
            return d
        }
        logger.info("shared ledger \(config.display) connected\(downSince.map { String(format: " after %.0f s away", Date().timeIntervalSince($0)) } ?? "")")
        var lastBeat = ContinuousClock.now
        while !Task.isCancelled {
            try await topUpUnits(connection)
            let sent = try await drain(connection)
            if ContinuousClock.now - lastBeat > .seconds(2) {
                try await register(connection, instance: instance)
                lastBeat = ContinuousClock.now
            }
            // The outbox is polled: its rows are written by triggers inside the ledger's
            // transactions, which have no hook of their own; a quarter second is what a
            // lab view may lag behind, and an idle poll is one indexed SQLite read.
            if sent == 0 { try await Task.sleep(for: .milliseconds(250)) }
        }
    }

    func connect() async throws -> LabConnection {
        let password: String?
        do { password = try config.password() } catch { throw LinkFailure(error.message) }
        var configuration: PostgresConnection.Configuration
        switch config.endpoint {
        case .tcp(let host, let port):
            configuration = .init(host: host, port: port, username: config.user, password: password, database: config.database, tls: try tls())
        case .unixSocket(let directory, let port):
            configuration = .init(unixSocketPath: "\(directory)/.s.PGSQL.\(port)", username: config.user, password: password, database: config.database)
        }
        configuration.options.connectTimeout = .seconds(5)
        return LabConnection(try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger))
    }

    private func tls() throws -> PostgresConnection.Configuration.TLS {
        guard config.tls != .disable else { return .disable }
        let context = try tlsContext.withLock { cached in
            if let cached { return cached }
            var c = TLSConfiguration.makeClientConfiguration()
            // As libpq: prefer/require encrypt but do not check the certificate.
            if config.tls != .verifyFull { c.certificateVerification = .none }
            let made = try NIOSSLContext(configuration: c)
            cached = made
            return made
        }
        return config.tls == .prefer ? .prefer(context) : .require(context)
    }

    /// Two stations starting at once both create the schema: an advisory lock takes turns.
    static func createSchema(_ c: LabConnection, logger: Logger) async throws {
        func run(_ q: PostgresQuery) async throws { _ = try await fetch(q, on: c, logger: logger) }
        try await run("SELECT pg_advisory_lock(1818)")
        do {
            for statement in schema { try await run(PostgresQuery(unsafeSQL: statement)) }
        } catch let error as PSQLError where error.serverInfo?[.sqlState] == "42501" {
            // A role that may not run DDL (the lab's DBA made the tables with another one):
            // PostgreSQL checks the right to create before it looks whether the object exists,
            // so even "if not exists" fails. The tables are used as they are; one that is
            // missing fails its first statement, naming it.
            logger.notice("shared ledger: this station's role may not create the lab's tables (\(describe(error))); using them as they are")
        } catch {
            try? await run("SELECT pg_advisory_unlock(1818)")
            throw error
        }
        try await run("SELECT pg_advisory_unlock(1818)")
    }

    static let schema = [
        """
        CREATE TABLE IF NOT EXISTS lab_station (name text PRIMARY KEY, instance text NOT NULL,
          first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL, outbox_pending integer NOT NULL DEFAULT 0)
        """,
        "CREATE SEQUENCE IF NOT EXISTS lab_unit_number",
        """
        CREATE TABLE IF NOT EXISTS lab_unit (number bigint PRIMARY KEY, station text NOT NULL, job bigint,
          reserved timestamptz NOT NULL, UNIQUE (station, job))
        """,
        """
        CREATE TABLE IF NOT EXISTS lab_job (station text NOT NULL, job bigint NOT NULL, kind text NOT NULL, slot text,
          device text NOT NULL, serial text, unit text, unit_number bigint, profile text, image text, state text NOT NULL,
          message text, bytes_total bigint, created timestamptz NOT NULL, updated timestamptz NOT NULL, PRIMARY KEY (station, job))
        """,
        "CREATE INDEX IF NOT EXISTS lab_job_updated ON lab_job (updated DESC)",
        """
        CREATE TABLE IF NOT EXISTS lab_job_event (station text NOT NULL, job bigint NOT NULL, seq bigint NOT NULL,
          state text NOT NULL, message text, at timestamptz NOT NULL, PRIMARY KEY (station, job, seq))
        """,
        """
        CREATE TABLE IF NOT EXISTS lab_job_user (station text NOT NULL, job bigint NOT NULL, name text NOT NULL,
          uid bigint NOT NULL, hash text NOT NULL, password_export text, PRIMARY KEY (station, job, name))
        """,
        // uid was `integer` (32 bits, signed) until a uid above 2^31 (a config may give up to
        // 2^32 - 2) was refused by it: a lab database made then is widened once.
        """
        DO $$ BEGIN
          IF (SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()
              AND table_name = 'lab_job_user' AND column_name = 'uid') = 'integer' THEN
            ALTER TABLE lab_job_user ALTER COLUMN uid TYPE bigint;
          END IF;
        END $$
        """,
        """
        CREATE TABLE IF NOT EXISTS lab_card (station text NOT NULL, id text NOT NULL, strength text NOT NULL, detail text NOT NULL,
          verdict text NOT NULL, reason text, last_job bigint, first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL,
          repairs integer NOT NULL, write_bytes_per_second double precision, PRIMARY KEY (station, id))
        """,
    ]

    /// Says this station is alive (and how far behind it is); refuses to go on when another
    /// station's ledger already uses this name (their rows would mix).
    private func register(_ c: LabConnection, instance: String) async throws {
        let pending = try await local.read(Ledger.outboxPending)
        let rows = try await fetch("""
            INSERT INTO lab_station (name, instance, first_seen, last_seen, outbox_pending) VALUES (\(station), \(instance), now(), now(), \(pending))
            ON CONFLICT (name) DO UPDATE SET last_seen = now(), outbox_pending = excluded.outbox_pending
            WHERE lab_station.instance = excluded.instance RETURNING name
            """, on: c)
        guard !rows.isEmpty else {
            throw LinkFailure("another station's ledger already calls itself \"\(station)\" in \(config.display): give this station its own name (station.name)")
        }
    }

    /// Keeps at least half a block of unit numbers in hand.
    private func topUpUnits(_ c: LabConnection) async throws {
        let free = try await local.read(Ledger.freeUnitNumbers)
        guard free * 2 <= config.unitBlock else { return }
        try await reserve(config.unitBlock - free, on: c)
    }

    /// Reserves `count` numbers from the lab's sequence for this station: in the database
    /// first (the numbers are this station's from then on), then locally. A crash between the
    /// two loses those numbers (a gap), never gives one twice.
    ///
    /// A number already in `lab_unit` is skipped, not taken: after the database was restored
    /// from a backup its sequence is behind the numbers stations hold (`reconcileUnits` puts
    /// those back), and the unique number is what decides. A sequence found behind is moved
    /// past the largest number in the table (racing another station's `nextval`, it can only
    /// fall back onto numbers the table already holds, which are skipped again).
    private func reserve(_ count: Int, on c: LabConnection) async throws {
        guard count > 0 else { return }
        var taken: [Int64] = []
        for _ in 0..<4 where taken.count < count {
            let wanted = count - taken.count
            let rows = try await fetch("""
                INSERT INTO lab_unit (number, station, reserved) SELECT nextval('lab_unit_number'), \(station), now()
                FROM generate_series(1, \(wanted)) ON CONFLICT (number) DO NOTHING RETURNING number
                """, on: c)
            let got = try rows.map { try $0.decode(Int64.self) }
            taken += got
            if got.count < wanted {
                // nextval, not last_value: a role may use the sequence without reading it (the
                // number nextval took here is given back).
                _ = try await fetch("""
                    SELECT setval('lab_unit_number', greatest((SELECT max(number) FROM lab_unit), nextval('lab_unit_number') - 1))
                    """, on: c)
            }
        }
        let now = Date(), numbers = taken
        try await local.write { db in
            for n in numbers { try db.execute(sql: "INSERT INTO labUnit (number, reserved) VALUES (?, ?)", arguments: [n, now]) }
        }
    }

    /// At every connect: the numbers this station holds are put back where the database lacks
    /// them (it was restored from a backup, or rebuilt), so that no other station is given
    /// them; a free one that another station holds by now is dropped here, and one a card of
    /// this station already carries is reported as the duplicate it is.
    private func reconcileUnits(_ c: LabConnection) async throws {
        let held = try await local.read { db in
            try Row.fetchAll(db, sql: "SELECT number, jobId FROM labUnit ORDER BY number").map { (number: $0["number"] as Int64, job: $0["jobId"] as Int64?) }
        }
        guard !held.isEmpty else { return }
        let free = held.filter { $0.job == nil }.map(\.number)
        let used = held.filter { $0.job != nil }
        let usedNumbers = used.map(\.number), usedJobs = used.compactMap(\.job)
        // Any conflict (the number, or this station's job under another number) keeps the
        // database's row.
        _ = try await fetch("""
            INSERT INTO lab_unit (number, station, job, reserved)
            SELECT n, \(station), j, now() FROM unnest(\(usedNumbers)::bigint[], \(usedJobs)::bigint[]) AS u(n, j)
            UNION ALL SELECT n, \(station), NULL, now() FROM unnest(\(free)::bigint[]) AS f(n)
            ON CONFLICT DO NOTHING
            """, on: c)
        let allNumbers = held.map(\.number)
        let lost = Set(try await fetch("SELECT number FROM lab_unit WHERE number = ANY(\(allNumbers)::bigint[]) AND station <> \(station)", on: c)
            .map { try $0.decode(Int64.self) })
        guard !lost.isEmpty else { return }
        let dropped = free.filter { lost.contains($0) }
        try await local.write { db in
            for n in dropped { try db.execute(sql: "DELETE FROM labUnit WHERE number = ? AND jobId IS NULL", arguments: [n]) }
        }
        if !dropped.isEmpty {
            logger.warning("shared ledger: unit numbers \(dropped.map(String.init).joined(separator: ", ")) that this station held are another station's in \(config.display) (the database was restored from a backup?): dropped here")
        }
        let doubled = used.filter { lost.contains($0.number) }
        if !doubled.isEmpty {
            logger.error("shared ledger: unit numbers \(doubled.map { "\($0.number) (job \($0.job ?? 0))" }.joined(separator: ", ")) were given to this station's cards and are another station's in \(config.display) (the database was restored from a backup while this station was away?): two units share each of these numbers")
        }
    }

    /// Called by a card that found the block empty: one try on a connection of its own.
    /// Returns nil when numbers were reserved, else why not.
    func reserveNow() async -> String? {
        do {
            try await withConnection(describingErrors: false) { c in
                // At a lab's very first start the replicator may not have made the tables yet.
                try await Self.createSchema(c, logger: logger)
                try await reserve(config.unitBlock, on: c)
            }
            return nil
        } catch {
            return Self.describe(error)
        }
    }

    /// One outbox entry: which local row changed. The row itself is read when it is sent, so
    /// a job changed five times while the database was away is sent as it is now, five times
    /// (each an idempotent upsert), never as a state it no longer has.
    struct OutboxEntry: Sendable {
        var id: Int64, kind: String, jobId: Int64?, eventId: Int64?, cardId: String?, unitNumber: Int64?
    }

    /// Sends the outbox in order, a batch at a time; each entry is removed once the database
    /// holds it. Returns how many were sent.
    private func drain(_ c: LabConnection) async throws -> Int {
        let batch = try await local.read { db in
            try Row.fetchAll(db, sql: "SELECT id, kind, jobId, eventId, cardId, unitNumber FROM labOutbox ORDER BY id LIMIT 200").map {
                OutboxEntry(id: $0["id"], kind: $0["kind"], jobId: $0["jobId"], eventId: $0["eventId"], cardId: $0["cardId"], unitNumber: $0["unitNumber"])
            }
        }
        guard !batch.isEmpty else { return 0 }
        var done: Int64?
        func forget() async throws {
            guard let done else { return }
            try await local.write { db in try db.execute(sql: "DELETE FROM labOutbox WHERE id <= ?", arguments: [done]) }
        }
        do {
            for entry in batch {
                do {
                    try await send(entry, on: c)
                } catch let error as PSQLError where Self.refusesData(error) {
                    // Sent again it would be refused again, and every entry after it would
                    // wait behind it for good: it is set aside, with the reason, and the
                    // outbox goes on.
                    try await setAside(entry, reason: Self.describe(error))
                }
                done = entry.id
            }
        } catch {
            // What the database holds is not sent again (it would be a no-op, but a slow one).
            try? await forget()
            throw error
        }
        try await forget()
        return batch.count
    }

    /// The database refuses what the entry holds, not the link: SQLSTATE classes 22 (data
    /// exception: a value out of range, a NUL in text) and 23 (integrity constraint).
    static func refusesData(_ error: PSQLError) -> Bool {
        guard let state = error.serverInfo?[.sqlState] else { return false }
        return state.hasPrefix("22") || state.hasPrefix("23")
    }

    /// Keeps an outbox entry the database refused in `labOutboxRejected` (the station's own
    /// SQLite file) with the database's reason, and says so in the log: the local row itself
    /// is untouched, so nothing of the station's own record is lost.
    private func setAside(_ entry: OutboxEntry, reason: String) async throws {
        try await local.write { db in
            try db.execute(sql: """
                INSERT INTO labOutboxRejected (id, kind, jobId, eventId, cardId, unitNumber, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [entry.id, entry.kind, entry.jobId, entry.eventId, entry.cardId, entry.unitNumber, reason, Date()])
        }
        logger.error("shared ledger \(config.display) refused the station's \(entry.kind) row\(entry.jobId.map { " of job \($0)" } ?? "")\(entry.cardId.map { " of card \($0)" } ?? ""): \(reason); it is kept in the station's ledger (labOutboxRejected) and the rest goes on")
    }

    /// A statement whose rows (if any) are not needed: read to the end, so the connection
    /// is ready for the next one.
    private func execute(_ query: PostgresQuery, on c: LabConnection) async throws {
        _ = try await fetch(query, on: c)
    }

    private func fetch(_ query: PostgresQuery, on c: LabConnection) async throws -> [PostgresRow] {
        try await Self.fetch(query, on: c, logger: logger)
    }

    /// Every statement goes through here. postgres-nio 1.33 writes a query to its channel
    /// without a promise: on a connection the server has already closed (a database stopped
    /// while this station was idle) the write fails silently and the query would wait
    /// forever — seen here, the replicator stuck "connected" to a stopped server. So a
    /// closed connection is refused up front, and a query still running when the connection
    /// closes, or after `queryDeadline`, ends with an error (the connection is closed then,
    /// and the replicator makes a new one). A task cancelled while its query runs (the daemon
    /// stopping) ends at once with CancellationError, closing the connection, rather than
    /// holding the shutdown up to `queryDeadline`.
    static func fetch(_ query: PostgresQuery, on c: LabConnection, logger: Logger, deadline: Duration = queryDeadline) async throws -> [PostgresRow] {
        guard !c.connection.isClosed else { throw LinkFailure("the database closed the connection") }
        let outcome = Once<Result<[PostgresRow], any Error>>()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[PostgresRow], any Error>) in
                outcome.arm { continuation.resume(with: $0) }
                // Cancelled before the outcome was armed: the handler's settle found nothing to
                // deliver to, so it is done here.
                if Task.isCancelled {
                    if outcome.settle(.failure(CancellationError())) { c.closeSoon() }
                    return
                }
                let watch = c.watch(outcome)
                let timer = Task {
                    try? await Task.sleep(for: deadline)
                    if !Task.isCancelled, outcome.settle(.failure(LinkFailure("no answer from the database within \(deadline)"))) {
                        c.closeSoon()
                    }
                }
                Task {
                    let result: Result<[PostgresRow], any Error>
                    do {
                        var rows: [PostgresRow] = []
                        for try await row in try await c.connection.query(query, logger: logger) { rows.append(row) }
                        result = .success(rows)
                    } catch {
                        result = .failure(error)
                    }
                    // Before the answer goes out: a statement that has returned is no longer watched.
                    c.unwatch(watch)
                    timer.cancel()
                    outcome.settle(result)
                }
            }
        } onCancel: {
            if outcome.settle(.failure(CancellationError())) { c.closeSoon() }
        }
    }

    /// Longer than any statement here takes (single rows, small batches), short enough that a
    /// database gone silent (a cable pulled: no FIN, no RST) is noticed and retried.
    static let queryDeadline = Duration.seconds(30)

    struct LocalJob: Sendable {
        var kind: String, slot: String?, device: String, serial: String?, unit: String?, unitNumber: Int64?, profile: String?, image: String?
        var state: String, message: String?, bytesTotal: Int64?, created: Date, updated: Date
    }

    private func send(_ entry: OutboxEntry, on c: LabConnection) async throws {
        switch entry.kind {
        case "job":
            guard let jobId = entry.jobId, let j = try await local.read({ db in
                try Row.fetchOne(db, sql: "SELECT job.*, labUnit.number AS unitNumber FROM job LEFT JOIN labUnit ON labUnit.jobId = job.id WHERE job.id = ?",
                                 arguments: [jobId]).map { row in
                    LocalJob(kind: row["kind"], slot: row["slot"], device: row["device"], serial: row["serial"], unit: row["unit"], unitNumber: row["unitNumber"],
                             profile: row["profile"], image: row["image"], state: row["state"], message: row["message"], bytesTotal: row["bytesTotal"],
                             created: row["created"], updated: row["updated"])
                }
            }) else { return }
            try await execute("""
                INSERT INTO lab_job (station, job, kind, slot, device, serial, unit, unit_number, profile, image, state, message, bytes_total, created, updated)
                VALUES (\(station), \(jobId), \(j.kind), \(j.slot), \(j.device), \(j.serial), \(j.unit), \(j.unitNumber), \(j.profile), \(j.image),
                        \(j.state), \(j.message), \(j.bytesTotal), \(j.created), \(j.updated))
                ON CONFLICT (station, job) DO UPDATE SET slot = excluded.slot, device = excluded.device, serial = excluded.serial,
                  unit = excluded.unit, unit_number = excluded.unit_number, profile = excluded.profile, image = excluded.image,
                  state = excluded.state, message = excluded.message, bytes_total = excluded.bytes_total, updated = excluded.updated
                """, on: c)
        case "event":
            guard let jobId = entry.jobId, let eventId = entry.eventId, let e = try await local.read({ db in
                try Row.fetchOne(db, sql: "SELECT state, message, at FROM jobEvent WHERE id = ?", arguments: [eventId]).map { row -> (String, String?, Date) in
                    (row["state"], row["message"], row["at"])
                }
            }) else { return }
            try await execute("""
                INSERT INTO lab_job_event (station, job, seq, state, message, at) VALUES (\(station), \(jobId), \(eventId), \(e.0), \(e.1), \(e.2))
                ON CONFLICT DO NOTHING
                """, on: c)
        case "users":
            guard let jobId = entry.jobId else { return }
            // The one user row the entry was made for (an entry from before rows were named
            // carries none: then all of the job's users, each sent once more does no harm).
            let users = try await local.read { db in
                try Row.fetchAll(db, sql: "SELECT name, uid, hash, passwordExport FROM jobUser WHERE jobId = ? AND (? IS NULL OR rowid = ?)",
                                 arguments: [jobId, entry.eventId, entry.eventId]).map { row -> (String, Int, String, String?) in
                    (row["name"], row["uid"], row["hash"], row["passwordExport"])
                }
            }
            for u in users {
                try await execute("""
                    INSERT INTO lab_job_user (station, job, name, uid, hash, password_export) VALUES (\(station), \(jobId), \(u.0), \(u.1), \(u.2), \(u.3))
                    ON CONFLICT DO NOTHING
                    """, on: c)
            }
        case "card":
            guard let id = entry.cardId else { return }
            let card = try await local.read { db in
                try Row.fetchOne(db, sql: "SELECT * FROM card WHERE id = ?", arguments: [id]).map(Ledger.card)
            }
            if let k = card {
                try await execute("""
                    INSERT INTO lab_card (station, id, strength, detail, verdict, reason, last_job, first_seen, last_seen, repairs, write_bytes_per_second)
                    VALUES (\(station), \(id), \(k.strength), \(k.detail), \(k.verdict), \(k.reason), \(k.lastJob), \(k.firstSeen), \(k.lastSeen), \(k.repairs), \(k.writeBytesPerSecond))
                    ON CONFLICT (station, id) DO UPDATE SET strength = excluded.strength, detail = excluded.detail, verdict = excluded.verdict,
                      reason = excluded.reason, last_job = excluded.last_job, last_seen = excluded.last_seen, repairs = excluded.repairs,
                      write_bytes_per_second = excluded.write_bytes_per_second
                    """, on: c)
            } else {
                // Forgotten by an admin (`provision cards forget`): forgotten in the lab too.
                try await execute("DELETE FROM lab_card WHERE station = \(station) AND id = \(id)", on: c)
            }
        case "unit":
            guard let number = entry.unitNumber else { return }
            let found = try await fetch("UPDATE lab_unit SET job = \(entry.jobId) WHERE number = \(number) AND station = \(station) RETURNING number", on: c)
            if found.isEmpty { logger.error("lab unit number \(number) is not this station's in \(config.display): the lab's numbering was changed by hand?") }
        default:
            logger.error("unknown outbox entry kind \(entry.kind): skipped")
        }
    }

    // MARK: - The lab's view (read-only, on a connection of its own)

    public func labJobs(station: String?, state: String?, slot: String?, limit: Int) async throws -> [JobRecord] {
        await labReads.enter()
        defer { labReads.leave() }
        return try await withConnection { c in
            let rows = try await Self.fetch("""
                SELECT station, job, kind, slot, device, serial, unit, profile, image, state, message, created, updated FROM lab_job
                WHERE (\(station)::text IS NULL OR station = \(station)) AND (\(state)::text IS NULL OR state = \(state))
                  AND (\(slot)::text IS NULL OR slot = \(slot))
                ORDER BY updated DESC, station, job DESC LIMIT \(max(1, min(limit, 10_000)))
                """, on: c, logger: logger)
            return try rows.map { try Self.job($0.makeRandomAccess()) }
        }
    }

    public func labStatus() async throws -> LabStatus {
        let asked = ContinuousClock.now
        await labReads.enter()
        defer { labReads.leave() }
        // Read by the request before this one, after this one asked (or just before): current.
        if let cached = labStatusCache.withLock({ $0 }), cached.at >= asked - Self.labStatusFreshFor {
            return cached.status
        }
        let status = try await readLabStatus()
        labStatusCache.withLock { $0 = (ContinuousClock.now, status) }
        return status
    }

    private func readLabStatus() async throws -> LabStatus {
        try await withConnection { c in
            var stations: [String: LabStationStatus] = [:]
            var order: [String] = []
            let summary = try await Self.fetch("""
                SELECT s.name, s.last_seen, s.outbox_pending, now() - s.last_seen < interval '15 seconds' AS live,
                  (SELECT count(*) FROM lab_job j WHERE j.station = s.name AND j.state = 'done' AND j.updated >= date_trunc('day', now())) AS done_today,
                  (SELECT count(*) FROM lab_job j WHERE j.station = s.name AND j.state IN ('failed', 'interrupted') AND j.updated >= date_trunc('day', now())) AS failed_today,
                  (SELECT count(*) FROM lab_job j WHERE j.station = s.name) AS jobs
                FROM lab_station s ORDER BY s.name
                """, on: c, logger: logger)
            for row in summary {
                let r = row.makeRandomAccess()
                let name = try r["name"].decode(String.self)
                order.append(name)
                stations[name] = LabStationStatus(name: name, lastSeen: try r["last_seen"].decode(Date.self), live: try r["live"].decode(Bool.self),
                                                  outboxPending: try r["outbox_pending"].decode(Int.self), jobs: try r["jobs"].decode(Int.self),
                                                  doneToday: try r["done_today"].decode(Int.self), failedToday: try r["failed_today"].decode(Int.self), running: [])
            }
            let finals = JobState.finalSQLList
            let running = try await Self.fetch("""
                SELECT station, job, kind, slot, device, serial, unit, profile, image, state, message, created, updated FROM lab_job
                WHERE state NOT IN (\(unescaped: finals)) ORDER BY station, slot, job
                """, on: c, logger: logger)
            for row in running {
                let job = try Self.job(row.makeRandomAccess())
                if let name = job.station { stations[name]?.running.append(job) }
            }
            let units = try await Self.fetch("SELECT count(*) FROM lab_unit WHERE job IS NOT NULL", on: c, logger: logger).first?.decode(Int64.self) ?? 0
            return LabStatus(database: config.display, stations: order.compactMap { stations[$0] }, unitsNumbered: Int(units))
        }
    }

    /// Runs `body` on a connection of its own, closed on every path. Its errors say which
    /// database failed and how, unless `describingErrors` is false (the caller says that).
    private func withConnection<T: Sendable>(describingErrors: Bool = true, _ body: (LabConnection) async throws -> T) async throws -> T {
        let c: LabConnection
        do { c = try await connect() } catch {
            guard describingErrors else { throw error }
            throw LinkFailure("the shared ledger \(config.display) is unreachable: \(Self.describe(error))")
        }
        do {
            let result = try await body(c)
            await c.close()
            return result
        } catch {
            await c.close()
            guard describingErrors else { throw error }
            throw LinkFailure("the shared ledger \(config.display) failed the query: \(Self.describe(error))")
        }
    }

    static func job(_ r: PostgresRandomAccessRow) throws -> JobRecord {
        var job = JobRecord(id: try r["job"].decode(Int64.self), kind: try r["kind"].decode(String.self), slot: try r["slot"].decode(String?.self),
                            device: try r["device"].decode(String.self), serial: try r["serial"].decode(String?.self), unit: try r["unit"].decode(String?.self),
                            profile: try r["profile"].decode(String?.self), image: try r["image"].decode(String?.self),
                            state: JobState(rawValue: try r["state"].decode(String.self)) ?? .failed, message: try r["message"].decode(String?.self),
                            created: try r["created"].decode(Date.self), updated: try r["updated"].decode(Date.self))
        job.station = try r["station"].decode(String.self)
        return job
    }

    /// postgres-nio keeps its errors' details out of `description` (they may hold data); the
    /// server's message and the cause are what an operator needs, and hold no password.
    static func describe(_ error: any Error) -> String {
        if let e = error as? LinkFailure { return e.message }
        guard let e = error as? PSQLError else { return "\(error)" }
        if let message = e.serverInfo?[.message] {
            return message + (e.serverInfo?[.detail].map { " (\($0))" } ?? "")
        }
        if let underlying = e.underlying { return "\(e.code): \(underlying)" }
        return "\(e.code)"
    }
}

public struct LinkFailure: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One connection to the shared ledger. It watches its own end once, for its whole life: a
/// statement still waiting when the connection closes is told so (see `fetch`). Watching
/// per statement instead would leave a callback on the channel for every statement until
/// the connection closes, and the replicator's connection lives for days.
final class LabConnection: Sendable {
    let connection: PostgresConnection
    private let waiting = Waiting()

    /// Statements waiting for their answer (normally one: statements on a connection go one
    /// after the other), and whether the connection has closed.
    final class Waiting: Sendable {
        let state = Mutex<(closed: Bool, next: Int, outcomes: [Int: Once<Result<[PostgresRow], any Error>>])>((false, 0, [:]))

        func closed() {
            let outcomes = state.withLock { s in
                s.closed = true
                defer { s.outcomes = [:] }
                return Array(s.outcomes.values)
            }
            for o in outcomes { o.settle(.failure(LinkFailure("the database closed the connection"))) }
        }
    }

    init(_ connection: PostgresConnection) {
        self.connection = connection
        connection.closeFuture.whenComplete { [waiting] _ in waiting.closed() }
    }

    /// Statements waiting now; zero between statements.
    var waitingCount: Int { waiting.state.withLock { $0.outcomes.count } }

    /// Settles `outcome` with an error if the connection closes before `unwatch`; at once if
    /// it has closed already.
    func watch(_ outcome: Once<Result<[PostgresRow], any Error>>) -> Int? {
        let id = waiting.state.withLock { s -> Int? in
            guard !s.closed else { return nil }
            s.next += 1
            s.outcomes[s.next] = outcome
            return s.next
        }
        if id == nil { outcome.settle(.failure(LinkFailure("the database closed the connection"))) }
        return id
    }

    func unwatch(_ id: Int?) {
        guard let id else { return }
        waiting.state.withLock { _ = $0.outcomes.removeValue(forKey: id) }
    }

    func close() async { try? await connection.close() }

    /// From code that cannot wait (a timer, a cancellation handler).
    func closeSoon() { connection.close().whenComplete { _ in } }
}

/// A result delivered once: the first of several racers settles it, the others are ignored.
/// Only whether it was settled is kept, not the value (the rows go to whoever waits).
final class Once<Value: Sendable>: Sendable {
    private enum State { case unarmed, armed(@Sendable (Value) -> Void), settled }
    private let state = Mutex(State.unarmed)

    /// Says where the result goes. Settling before this is a no-op (returns false): the
    /// racers start after it, and a canceller that came earlier is checked for again after it.
    func arm(_ deliver: @escaping @Sendable (Value) -> Void) {
        state.withLock { s in
            if case .unarmed = s { s = .armed(deliver) }
        }
    }

    /// True for the racer that settled it.
    @discardableResult
    func settle(_ value: Value) -> Bool {
        let deliver = state.withLock { s -> (@Sendable (Value) -> Void)? in
            guard case .armed(let deliver) = s else { return nil }
            s = .settled
            return deliver
        }
        deliver?(value)
        return deliver != nil
    }
}

/// One at a time, in arrival order, for async callers (a mutex that suspends instead of
/// blocking a thread of the cooperative pool). A waiter is not cancellable: what it waits
/// for is one short read.
final class AsyncGate: Sendable {
    private let state = Mutex<(busy: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func enter() async {
        await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
            let enters = state.withLock { s -> Bool in
                if !s.busy { s.busy = true; return true }
                s.waiters.append(waiter)
                return false
            }
            if enters { waiter.resume() }
        }
    }

    func leave() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard !s.waiters.isEmpty else { s.busy = false; return nil }
            return s.waiters.removeFirst()
        }
        next?.resume()
    }
}
