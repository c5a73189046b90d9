// A real PostgreSQL server of a test's own (issue 18: the lab's shared ledger): Debian's
// `postgresql` binaries, a cluster made by `initdb` in a temporary directory, run by
// `pg_ctl` as `nobody` (postgres refuses to run as root), listening on 127.0.0.1 at a free
// port and on a Unix socket in that directory, with password (SCRAM) authentication for one
// user. `stop()`/`start()` stop and restart the same cluster (a database that goes away
// mid-batch); `close()` stops it for good and removes the directory, and deinit does so on
// any path a test leaves by.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public struct PostgresServerError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public final class PostgresServer: Sendable {
    public let directory: String
    private let scratch: TemporaryDirectory
    public let port: Int
    public let user = "provision"
    public let database = "lab"
    public let password: String
    /// A file holding the password (mode 0600, owned by root), as `ledger_password_file` takes it.
    public let passwordFile: String
    let binDirectory: String
    private let closed = Mutex(false)

    public var dataDirectory: String { directory + "/data" }
    public var logPath: String { directory + "/postgres.log" }
    /// `postgresql://provision@127.0.0.1:PORT/lab`
    public var url: String { "postgresql://\(user)@127.0.0.1:\(port)/\(database)?sslmode=disable" }

    /// Debian installs the server's programs under /usr/lib/postgresql/<major>/bin, not in PATH.
    public static func findBinaries() -> String? {
        let root = "/usr/lib/postgresql"
        let majors = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap(Int.init).sorted(by: >)
        return majors.map { "\(root)/\($0)/bin" }.first { access($0 + "/initdb", X_OK) == 0 && access($0 + "/pg_ctl", X_OK) == 0 }
    }

    public init() throws {
        guard let bin = Self.findBinaries() else {
            throw PostgresServerError(description: "no PostgreSQL server under /usr/lib/postgresql/*/bin: apt-get install postgresql (the Makefile's DEB_TOOLS has it)")
        }
        binDirectory = bin
        scratch = try TemporaryDirectory("provision-pg")
        directory = scratch.path
        password = "pw-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        // The password file the daemon reads stays root's (0600).
        passwordFile = try scratch.write("ledger.password", password, mode: 0o600)
        port = try ChildProcess.freePort()
        do {
            // The cluster's directory belongs to nobody; a copy of the password for initdb is
            // nobody's and removed after.
            try Command.check(["chown", "nobody:nogroup", directory])
            let initPassword = try scratch.write("initdb.password", password, mode: 0o600)
            try Command.check(["chown", "nobody:nogroup", initPassword])
            try asNobody(["\(bin)/initdb", "-D", dataDirectory, "-U", user, "--pwfile=\(initPassword)", "--auth=scram-sha-256",
                          "-E", "UTF8", "--no-sync", "--no-instructions"], timeout: .seconds(120))
            try? FileManager.default.removeItem(atPath: initPassword)
            try start()
            try psql("CREATE DATABASE \(database)", database: "postgres")
        } catch {
            close()
            throw error
        }
    }

    deinit { close() }

    /// Starts the cluster and waits until it accepts connections.
    public func start() throws {
        try asNobody(["\(binDirectory)/pg_ctl", "-D", dataDirectory, "-l", logPath, "-w", "-t", "120", "-o",
                      "-p \(port) -k \(directory) -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40", "start"],
                     timeout: .seconds(150))
    }

    /// Stops the cluster (`-m fast`: clients are disconnected, as when a database host goes
    /// away), and waits until it has.
    public func stop() throws {
        try asNobody(["\(binDirectory)/pg_ctl", "-D", dataDirectory, "-m", "fast", "-w", "-t", "120", "stop"], timeout: .seconds(150))
    }

    /// Stops the server if it runs and removes its directory. Idempotent; never throws.
    public func close() {
        let already = closed.withLock { c -> Bool in defer { c = true }; return c }
        guard !already else { return }
        if FileManager.default.fileExists(atPath: dataDirectory + "/postmaster.pid") {
            _ = try? asNobody(["\(binDirectory)/pg_ctl", "-D", dataDirectory, "-m", "immediate", "-w", "-t", "60", "stop"], timeout: .seconds(90))
        }
        scratch.remove()
    }

    /// Runs SQL with psql as the cluster's user over TCP (a peer that is not the code under
    /// test); returns its unaligned, tuples-only output.
    @discardableResult
    public func psql(_ sql: String, database: String? = nil) throws -> String {
        let out = try Command.check(["\(binDirectory)/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", "\(port)",
                                     "-U", user, "-d", database ?? self.database, "-c", sql],
                                    environment: ["PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"], timeout: .seconds(60))
        return out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private func asNobody(_ arguments: [String], timeout: Duration) throws {
        let out = try Command.run(["runuser", "-u", "nobody", "--"] + arguments, timeout: timeout)
        guard out.succeeded else {
            let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            throw PostgresServerError(description: "\(arguments.first.map { ($0 as NSString).lastPathComponent } ?? "") failed: \(out)\npostgres log:\n\(log)")
        }
    }
}
