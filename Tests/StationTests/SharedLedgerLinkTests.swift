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
}
