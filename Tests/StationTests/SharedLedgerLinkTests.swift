import Foundation
import GRDB
import Testing
import TestSupport
@testable import Station

/// The link's statements on a real PostgreSQL server (issue 18): a connection that lives for
/// days keeps nothing per statement, and a task cancelled mid-statement ends at once.
@Suite("Shared ledger link")
struct SharedLedgerLinkTests {
    static func withLedger(_ body: (SharedLedger, PostgresServer) async throws -> Void) async throws {
        let server = try await offPool { try PostgresServer() }
        defer { server.close() }
        let config = try LabLedgerConfig.parse(url: server.url, passwordFile: server.passwordFile)
        let shared = SharedLedger(config: config, station: "link-test", local: try DatabaseQueue())
        try await body(shared, server)
    }

    @Test("statements one after the other on one connection leave nothing watched between them")
    func statementsLeaveNothingBehind() async throws {
        try await Self.withLedger { shared, _ in
            let c = try await shared.connect()
            for i in 0..<300 {
                let rows = try await SharedLedger.fetch("SELECT \(i)::bigint", on: c, logger: shared.logger)
                #expect(try rows.first?.decode(Int64.self) == Int64(i))
                #expect(c.waitingCount == 0, "statement \(i) is still watched after it returned")
            }
            await c.close()
        }
    }

    @Test("a task cancelled while its statement runs ends with CancellationError and closes the connection")
    func cancelledStatementEnds() async throws {
        try await Self.withLedger { shared, _ in
            let c = try await shared.connect()
            let other = try await shared.connect()
            // The statement's answer deadline outlasts the wait below: on a loaded `make test`
            // the server was once seen running it only after the link's 30 s deadline had
            // ended it (LinkFailure instead of CancellationError), twice.
            let running = Task { try await SharedLedger.fetch("SELECT pg_sleep(600)", on: c, logger: shared.logger, deadline: .seconds(900)) }
            // Cancel once the server runs the statement (not before it was sent).
            let started = ContinuousClock.now
            var seen = false
            while !seen, ContinuousClock.now < started + .seconds(300) {
                let busy = try await SharedLedger.fetch("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)' AND state = 'active'",
                                                        on: other, logger: shared.logger)
                seen = try busy.first?.decode(Int64.self) == 1
                if !seen { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(seen, "the server was not seen running the statement within \(ContinuousClock.now - started)")
            running.cancel()
            await #expect(throws: CancellationError.self) { _ = try await running.value }
            try await c.connection.closeFuture.get()
            #expect(c.connection.isClosed)
            #expect(c.waitingCount == 0)
            await other.close()
        }
    }

    @Test("a statement on a connection the server ended fails saying so")
    func closedByServer() async throws {
        try await Self.withLedger { shared, _ in
            let c = try await shared.connect()
            let other = try await shared.connect()
            let running = Task { try await SharedLedger.fetch("SELECT pg_sleep(600)", on: c, logger: shared.logger) }
            let deadline = ContinuousClock.now + .seconds(300)
            var ended = false
            while !ended, ContinuousClock.now < deadline {
                let rows = try await SharedLedger.fetch("""
                    SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)' AND state = 'active') t
                    """, on: other, logger: shared.logger)
                ended = try rows.first?.decode(Int64.self) == 1
                if !ended { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(ended)
            let error = await #expect(throws: (any Error).self) { _ = try await running.value }
            #expect(!(error is CancellationError))
            #expect(c.waitingCount == 0)
            await #expect(throws: LinkFailure.self) { _ = try await SharedLedger.fetch("SELECT 1", on: c, logger: shared.logger) }
            await other.close()
        }
    }

    @Test("an outbox entry the database refuses for what it holds is set aside with the reason, the entries after it are delivered, and a uid above 2^31 in a database made with a 32-bit column is not refused")
    func refusedEntryIsSetAside() async throws {
        let server = try await offPool { try PostgresServer() }
        defer { server.close() }
        // A lab database as an earlier version made it: uid a 32-bit integer.
        _ = try server.psql("""
            CREATE TABLE lab_job_user (station text NOT NULL, job bigint NOT NULL, name text NOT NULL,
              uid integer NOT NULL, hash text NOT NULL, password_export text, PRIMARY KEY (station, job, name))
            """)
        let dir = try TemporaryDirectory()
        let lab = try LabLedgerConfig.parse(url: server.url, passwordFile: server.passwordFile)
        let ledger = try Ledger(path: dir.file("ledger.sqlite"), lab: lab, station: "refusing")
        let shared = try #require(ledger.shared)
        // The schema as the station makes it (widening the old column), and a rule of the
        // lab's own that one row breaks: the database refuses that row for what it holds.
        let c = try await shared.connect()
        try await SharedLedger.createSchema(c, logger: shared.logger)
        await c.close()
        #expect(try server.psql("SELECT data_type FROM information_schema.columns WHERE table_name = 'lab_job_user' AND column_name = 'uid'") == "bigint")
        _ = try server.psql("ALTER TABLE lab_job ADD CONSTRAINT no_refused CHECK (device <> '/dev/refused')")
        let refused = try await ledger.insert(.init(kind: "sd", slot: "A", device: "/dev/refused", deviceNumber: 1, diskSequence: 1,
                                                    serial: nil, unit: nil, profile: nil, image: nil))
        let later = try await ledger.insert(.init(kind: "sd", slot: "B", device: "/dev/sdb", deviceNumber: 2, diskSequence: 1,
                                                  serial: nil, unit: nil, profile: nil, image: nil))
        try await ledger.recordUsers(job: later.id, users: [(name: "lab", uid: 3_000_000_000, hash: "$y$j9T$salt$hash")])
        let replicator = Task { await shared.run() }
        defer { replicator.cancel() }
        let deadline = ContinuousClock.now + .seconds(120)
        while try await ledger.db.read(Ledger.outboxPending) > 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(try await ledger.db.read(Ledger.outboxPending) == 0, "the outbox drains past the refused entry")
        #expect(try server.psql("SELECT job, device FROM lab_job WHERE station = 'refusing' ORDER BY job") == "\(later.id)|/dev/sdb")
        #expect(try server.psql("SELECT name, uid FROM lab_job_user WHERE station = 'refusing'") == "lab|3000000000")
        let kept = try await ledger.db.read { db in
            try Row.fetchAll(db, sql: "SELECT kind, jobId, reason FROM labOutboxRejected ORDER BY id").map { ($0["kind"] as String, $0["jobId"] as Int64, $0["reason"] as String) }
        }
        let job = try #require(kept.first { $0.0 == "job" }, "the refused job row is kept: \(kept)")
        #expect(job.1 == refused.id)
        #expect(job.2.contains("no_refused"), "the database's reason: \(job.2)")
        #expect(kept.allSatisfy { $0.1 == refused.id }, "only the refused job's entries are set aside: \(kept)")
        #expect(try await ledger.lastJob(deviceNumber: 1, diskSequence: 1)?.id == refused.id, "the station's own row is untouched")
    }

    /// The lab's schema made by the server's owner, then a login role of its own (`grants`:
    /// what else it is given or denied) and a station's link as that role.
    static func ledger(as role: String, on server: PostgresServer, owner: SharedLedger, in dir: TemporaryDirectory,
                       grants: (String) -> String) async throws -> SharedLedger {
        let c = try await owner.connect()
        try await SharedLedger.createSchema(c, logger: owner.logger)
        await c.close()
        let password = "pw-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        _ = try server.psql("CREATE ROLE \(role) LOGIN PASSWORD '\(password)'; " + grants(role))
        let passwordFile = try dir.write(role + ".password", password, mode: 0o600)
        let url = server.url.replacingOccurrences(of: "//\(server.user)@", with: "//\(role)@")
        return SharedLedger(config: try LabLedgerConfig.parse(url: url, passwordFile: passwordFile), station: role, local: try DatabaseQueue())
    }

    @Test("many clients asking for the lab's view at once take one database connection at a time: a role limited to 2 connections answers all 24")
    func labReadsShareOneConnection() async throws {
        try await Self.withLedger { owner, server in
            // PostgreSQL's own limit, per role (a superuser has none, so a role of its own):
            // a connection per request would pass it.
            let dir = try TemporaryDirectory()
            let shared = try await Self.ledger(as: "lab_reader", on: server, owner: owner, in: dir) {
                "ALTER ROLE \($0) CONNECTION LIMIT 2; GRANT SELECT ON ALL TABLES IN SCHEMA public TO \($0)"
            }
            // The lab's tables locked for 3 s by another session: every read that connects
            // waits, so reads made each on a connection of their own would all be open at once.
            let locker = Task { try await offPool { try server.psql("BEGIN; LOCK TABLE lab_station, lab_job IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT") } }
            var locked = false
            let deadline = ContinuousClock.now + .seconds(60)
            while !locked, ContinuousClock.now < deadline {
                locked = try server.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'lab_job' AND l.mode = 'AccessExclusiveLock' AND l.granted") == "1"
            }
            #expect(locked, "the premise: the tables are locked")
            let answers = await withTaskGroup(of: Result<Int, any Error>.self) { group in
                for i in 0..<24 {
                    group.addTask {
                        do {
                            if i % 2 == 0 { return .success(try await shared.labStatus().stations.count) }
                            return .success(try await shared.labJobs(station: nil, state: nil, slot: nil, limit: 10).count)
                        } catch { return .failure(error) }
                    }
                }
                var all: [Result<Int, any Error>] = []
                for await r in group { all.append(r) }
                return all
            }
            let failures = answers.compactMap { r -> String? in if case .failure(let e) = r { return "\(e)" } else { return nil } }
            _ = try await locker.value
            #expect(answers.count == 24)
            #expect(failures.isEmpty, "\(failures.count) of 24 failed, e.g. \(failures.first ?? "")")
        }
    }

    @Test("a station whose role may not run DDL connects to a lab whose tables its DBA made, and uses them as they are")
    func roleWithoutDDLConnects() async throws {
        try await Self.withLedger { owner, server in
            let dir = try TemporaryDirectory()
            let shared = try await Self.ledger(as: "station_dml", on: server, owner: owner, in: dir) {
                "REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \($0); "
                    + "GRANT USAGE, UPDATE ON SEQUENCE lab_unit_number TO \($0)"
            }
            let dml = try await shared.connect()
            // The premise: this role may not create, even what exists.
            await #expect(throws: (any Error).self) {
                _ = try await SharedLedger.fetch("CREATE TABLE IF NOT EXISTS lab_station (name text PRIMARY KEY)", on: dml, logger: shared.logger)
            }
            try await SharedLedger.createSchema(dml, logger: shared.logger)
            #expect(try await shared.labStatus().stations.isEmpty)
            await dml.close()
        }
    }

    /// Runs the station's replicator until it is connected with its outbox sent, then stops it.
    static func connectOnce(_ ledger: Ledger) async throws {
        let shared = try #require(ledger.shared)
        let replicator = Task { await shared.run() }
        defer { replicator.cancel() }
        // A ceiling, not a timing: the replicator's steps resume on Swift's pool, which other
        // suites' synchronous tests can hold for minutes in a full parallel run.
        let deadline = ContinuousClock.now + .seconds(600)
        while ContinuousClock.now < deadline {
            let state = await shared.outboxState()
            if state.connected && state.pending == 0 { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        let state = await shared.outboxState()
        #expect(state.connected && state.pending == 0, "\(state)")
        replicator.cancel()
        await replicator.value
    }

    static func held(_ ledger: Ledger, free: Bool = false) async throws -> [Int64] {
        try await ledger.db.read { db in
            try Int64.fetchAll(db, sql: "SELECT number FROM labUnit \(free ? "WHERE jobId IS NULL " : "")ORDER BY number")
        }
    }

    @Test("a lab database restored from a backup: the numbers a station holds are put back at its next connect and never given to another station; a free number another station took meanwhile is dropped, not shared")
    func restoredDatabaseKeepsNumbersUnique() async throws {
        let server = try await offPool { try PostgresServer() }
        defer { server.close() }
        let dir = try TemporaryDirectory()
        let lab = try LabLedgerConfig.parse(url: server.url, passwordFile: server.passwordFile, unitBlock: 4)
        let a = try Ledger(path: dir.file("a.sqlite"), lab: lab, station: "tower-a")
        let b = try Ledger(path: dir.file("b.sqlite"), lab: lab, station: "tower-b")
        let c = try Ledger(path: dir.file("c.sqlite"), lab: lab, station: "tower-c")
        // A holds 1-4, and its first card carries 1.
        try await Self.connectOnce(a)
        #expect(try await Self.held(a) == [1, 2, 3, 4])
        let job = try await a.insert(.init(kind: "sd", slot: "A", device: "/dev/sda", deviceNumber: 1, diskSequence: 1,
                                           serial: nil, unit: nil, profile: nil, image: nil))
        #expect(try a.takeUnitNumber(job: job.id) == 1)
        try await Self.connectOnce(a)
        #expect(try server.psql("SELECT number, station, coalesce(job, 0) FROM lab_unit ORDER BY number")
                == "1|tower-a|\(job.id)\n2|tower-a|0\n3|tower-a|0\n4|tower-a|0")

        // The database comes back from a backup made before any of it.
        _ = try server.psql("DELETE FROM lab_unit; SELECT setval('lab_unit_number', 1, false)")
        try await Self.connectOnce(a)
        #expect(try server.psql("SELECT number, station, coalesce(job, 0) FROM lab_unit ORDER BY number")
                == "1|tower-a|\(job.id)\n2|tower-a|0\n3|tower-a|0\n4|tower-a|0", "A's numbers are the lab's again")
        try await Self.connectOnce(b)
        #expect(try await Self.held(b) == [5, 6, 7, 8], "the rewound sequence's numbers that A holds are skipped")

        // Again, and this time C asks before A and B are back: C is given numbers A and B hold.
        _ = try server.psql("DELETE FROM lab_unit; SELECT setval('lab_unit_number', 1, false)")
        try await Self.connectOnce(c)
        try await Self.connectOnce(a)
        try await Self.connectOnce(b)
        let free = (a: try await Self.held(a, free: true), b: try await Self.held(b, free: true), c: try await Self.held(c, free: true))
        let all = free.a + free.b + free.c
        #expect(Set(all).count == all.count, "a free number held by two stations: \(free)")
        for (ledger, station) in [(a, "tower-a"), (b, "tower-b"), (c, "tower-c")] {
            for n in try await Self.held(ledger, free: true) {
                #expect(try server.psql("SELECT station FROM lab_unit WHERE number = \(n)") == station, "\(station) holds \(n)")
            }
        }
        #expect(free.a.count >= 2 && free.b.count >= 2 && free.c.count >= 2, "each station has numbers in hand again: \(free)")
    }
}
