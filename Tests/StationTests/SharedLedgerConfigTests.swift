#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TestSupport
@testable import Station

/// The shared ledger's settings (issue 18): the URL, where the password comes from, and that a
/// station with a plain SQLite ledger is exactly what it was.
@Suite("Shared ledger settings")
struct SharedLedgerConfigTests {
    func parse(_ url: String) throws(LabConfigProblem) -> LabLedgerConfig { try LabLedgerConfig.parse(url: url, passwordFile: nil) }

    @Test("a postgresql:// URL gives host, port, user, database and TLS mode")
    func parsesURL() throws {
        let c = try parse("postgresql://lab@db.example:6543/provision?sslmode=require")
        #expect(c.endpoint == .tcp(host: "db.example", port: 6543))
        #expect(c.user == "lab" && c.database == "provision" && c.tls == .require)
        #expect(c.display == "postgresql://lab@db.example:6543/provision")
        let d = try parse("postgres://lab@10.0.0.5/provision")
        #expect(d.endpoint == .tcp(host: "10.0.0.5", port: 5432) && d.tls == .prefer)
        let socket = try parse("postgresql://lab@%2Frun%2Fpostgresql/provision")
        #expect(socket.endpoint == .unixSocket(directory: "/run/postgresql", port: 5432))
    }

    @Test("a URL with a password, no user, no database or an unknown parameter is refused with the reason", arguments: [
        ("postgresql://lab:secret@db/provision", "holds a password"),
        ("postgresql://lab@db/provision?password=secret", "holds a password"),
        ("postgresql://db/provision", "names no user"),
        ("postgresql://lab@db/", "names no database"),
        ("postgresql://lab@db/provision?sslmode=sometimes", "sslmode=sometimes is not one of"),
        ("postgresql://lab@db/provision?connect_timeout=3", "unknown URL parameter connect_timeout"),
        ("mysql://lab@db/provision", "not a PostgreSQL URL"),
        ("postgresql://lab@%2Frun/provision?sslmode=require", "a socket has no TLS"),
    ])
    func refusesBadURL(url: String, reason: String) {
        let error = #expect(throws: LabConfigProblem.self) { _ = try parse(url) }
        #expect(error?.message.contains(reason) == true, "\(error.map(\.message) ?? "no error")")
    }

    @Test("the password comes from ledger_password_file's first line; a missing, empty or open file is an error naming it")
    func passwordFile() throws {
        let dir = try TemporaryDirectory("shared-ledger")
        let file = try dir.write("pw", "s3cret:with:colons\nignored\n", mode: 0o600)
        var c = try parse("postgresql://lab@db/provision")
        c.passwordFile = file
        #expect(try c.password() == "s3cret:with:colons")
        chmod(file, 0o640)
        #expect(#expect(throws: LabConfigProblem.self) { try c.password() }?.message.contains("can be read by others (mode 640): chmod 600 it") == true)
        c.passwordFile = try dir.write("empty", "\n", mode: 0o600)
        #expect(#expect(throws: LabConfigProblem.self) { try c.password() }?.message.contains("is empty") == true)
        c.passwordFile = dir.file("nothing")
        #expect(#expect(throws: LabConfigProblem.self) { try c.password() }?.message == "cannot read the ledger_password_file \(dir.file("nothing")): no such file")
    }

    @Test("~/.pgpass lines are matched as libpq matches them: fields, * and escapes")
    func pgpass() throws {
        let c = try parse("postgresql://lab@db.example:5433/provision")
        let text = """
            # comment
            other:5433:provision:lab:wrong
            db.example:5432:provision:lab:wrong-port
            db.example:5433:*:lab:pa\\:ss\\\\word
            *:*:*:*:fallback
            """
        #expect(try LabLedgerConfig.pgpassLookup(text, for: c) == "pa:ss\\word")
        let other = try parse("postgresql://someone@elsewhere/x")
        #expect(try LabLedgerConfig.pgpassLookup(text, for: other) == "fallback")
        #expect(try LabLedgerConfig.pgpassLookup("db.example:5433:provision:lab:x", for: other) == nil)
    }

    func config(_ stationLines: String, in dir: TemporaryDirectory) throws -> String {
        let image = try dir.write("i.img", [UInt8](repeating: 0, count: 4096))
        return """
            [station]
            \(stationLines)
            [profiles.p]
            image = "\(image)"
            [[slots]]
            name = "S1"
            match = "loop:*"
            profile = "p"
            """
    }

    @Test("ledger = postgresql://… keeps a local ledger file (ledger_local, default the usual path); the SQLite-only keys are refused without it")
    func stationConfigKeys() throws {
        let dir = try TemporaryDirectory("shared-ledger")
        let shared = try StationConfig.parse(text: try config("ledger = \"postgresql://lab@db/provision\"\nledger_unit_block = 4", in: dir), file: dir.file("s.toml"))
        #expect(shared.lab?.database == "provision" && shared.lab?.unitBlock == 4)
        #expect(shared.ledgerPath == "/var/lib/provision/ledger.sqlite")
        let local = try StationConfig.parse(text: try config("ledger = \"postgresql://lab@db/provision\"\nledger_local = \"l.sqlite\"", in: dir), file: dir.file("s.toml"))
        #expect(local.ledgerPath == dir.file("l.sqlite"))
        let plain = try StationConfig.parse(text: try config("ledger = \"x.sqlite\"", in: dir), file: dir.file("s.toml"))
        #expect(plain.lab == nil && plain.ledgerPath == dir.file("x.sqlite"))
        let sqliteOnly = try config("ledger = \"x.sqlite\"\nledger_password_file = \"pw\"", in: dir)
        let wrong = #expect(throws: ConfigError.self) { try StationConfig.parse(text: sqliteOnly, file: dir.file("s.toml")) }
        #expect(wrong.map { "\($0)" }?.contains("only for a shared ledger") == true)
        let withPassword = try config("ledger = \"postgresql://lab:pw@db/provision\"", in: dir)
        let inURL = #expect(throws: ConfigError.self) { try StationConfig.parse(text: withPassword, file: dir.file("s.toml")) }
        #expect(inURL.map { "\($0)" }.map { $0.contains("station.ledger") && $0.contains("holds a password") } == true)
    }

    @Test("a plain SQLite ledger has no outbox: its file holds the tables it always had, and unit numbers are job ids")
    func sqliteLedgerUnchanged() async throws {
        let dir = try TemporaryDirectory("shared-ledger")
        let ledger = try Ledger(path: dir.file("ledger.sqlite"))
        #expect(ledger.shared == nil)
        let job = try await ledger.insert(.init(kind: "sd", slot: "S1", device: "/dev/loop9", deviceNumber: 1, diskSequence: 2, serial: nil,
                                                unit: nil, profile: "p", image: "i"))
        #expect(try ledger.unitSequence(job: job.id) == job.id)
        let tables = try Command.check(["sqlite3", dir.file("ledger.sqlite"), "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"]).stdout
        #expect(!tables.contains("labOutbox") && !tables.contains("labUnit"), "\(tables)")
    }

    @Test("with a shared ledger every local row is in the outbox in order, in the same transaction; a station moved back to SQLite adds none")
    func outboxFollowsEveryRow() async throws {
        let dir = try TemporaryDirectory("shared-ledger")
        let lab = try parse("postgresql://lab@127.0.0.1:1/provision?sslmode=disable")
        do {
            let ledger = try Ledger(path: dir.file("ledger.sqlite"), lab: lab, station: "s1")
            let job = try await ledger.insert(.init(kind: "sd", slot: "S1", device: "/dev/loop9", deviceNumber: 1, diskSequence: 2, serial: nil,
                                                    unit: nil, profile: "p", image: "i"))
            try await ledger.record(job: job.id, state: .writing, message: nil)
            try await ledger.recordUsers(job: job.id, users: [(name: "tech", uid: 1000, hash: "$6$x$y")])
            try await ledger.rememberCard(id: "cid:1", strength: "cid", detail: "d", verdict: "good", reason: nil, job: job.id)
            try await ledger.forgetCard(id: "cid:1")
            let kinds = try Command.check(["sqlite3", dir.file("ledger.sqlite"), "SELECT kind FROM labOutbox ORDER BY id"]).stdout
            #expect(kinds.split(separator: "\n") == ["job", "event", "job", "event", "users", "card", "card"])
        }
        // Opened again as a plain SQLite ledger: the triggers were this connection's only.
        let plain = try Ledger(path: dir.file("ledger.sqlite"))
        _ = try await plain.insert(.init(kind: "sd", slot: "S1", device: "/dev/loop9", deviceNumber: 1, diskSequence: 3, serial: nil,
                                         unit: nil, profile: "p", image: "i"))
        let count = try Command.check(["sqlite3", dir.file("ledger.sqlite"), "SELECT COUNT(*) FROM labOutbox"]).stdout
        #expect(count.trimmingCharacters(in: .whitespacesAndNewlines) == "7")
    }
}
