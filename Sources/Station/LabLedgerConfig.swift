import Foundation

/// Where a lab's shared ledger is (issue 18): `ledger = "postgresql://user@host:port/db"` in
/// the station config. The password is never in the config (it is shown by `config check`,
/// kept in backups, pasted into issues): it comes from `ledger_password_file` (the password
/// alone on the first line), or else from libpq's password file (`$PGPASSFILE` or
/// `~/.pgpass`, `host:port:database:user:password` lines), as psql would find it.
public struct LabLedgerConfig: Sendable, Equatable {
    public enum Endpoint: Sendable, Equatable {
        case tcp(host: String, port: Int)
        /// `postgresql://user@%2Frun%2Fpostgresql/db`: a directory holding `.s.PGSQL.<port>`.
        case unixSocket(directory: String, port: Int)
    }
    /// libpq's `sslmode`: disable, prefer (the default: TLS when the server offers it, its
    /// certificate unchecked, as libpq does), require (TLS or nothing, unchecked) or
    /// verify-full (TLS with the certificate checked against the system's roots and the host).
    public enum TLSMode: String, Sendable, Equatable { case disable, prefer, require, verifyFull = "verify-full" }

    public var endpoint: Endpoint
    public var user: String
    public var database: String
    public var tls: TLSMode
    public var passwordFile: String?
    /// Lab unit numbers this station keeps reserved ahead, so that it can number units while
    /// the database is away (see `LabLedger`'s note on unit numbers).
    public var unitBlock: Int

    /// "postgresql://lab@db.example:5432/provision" without any password: for logs and errors.
    public var display: String {
        switch endpoint {
        case .tcp(let host, let port): "postgresql://\(user)@\(host.contains(":") ? "[\(host)]" : host):\(port)/\(database)"
        case .unixSocket(let dir, let port): "postgresql://\(user)@\(dir):\(port)/\(database) (Unix socket)"
        }
    }

    private static let passwordInURL = "the URL holds a password: remove it, and put it in the file that ledger_password_file names (or in ~/.pgpass)"

    public static func isURL(_ s: String) -> Bool { s.hasPrefix("postgresql://") || s.hasPrefix("postgres://") }

    /// Parses the URL; the message of a thrown error says what is wrong with it.
    public static func parse(url text: String, passwordFile: String?, unitBlock: Int = 32) throws(LabConfigProblem) -> LabLedgerConfig {
        guard let components = URLComponents(string: text), let scheme = components.scheme, ["postgresql", "postgres"].contains(scheme) else {
            throw LabConfigProblem("not a PostgreSQL URL: write postgresql://USER@HOST:PORT/DATABASE")
        }
        if components.password != nil {
            throw LabConfigProblem(Self.passwordInURL)
        }
        guard let user = components.user, !user.isEmpty else {
            throw LabConfigProblem("the URL names no user: write postgresql://USER@HOST:PORT/DATABASE")
        }
        guard let host = components.percentEncodedHost.flatMap({ $0.removingPercentEncoding }), !host.isEmpty else {
            throw LabConfigProblem("the URL names no host: write postgresql://USER@HOST:PORT/DATABASE (a Unix socket's directory as %2Frun%2Fpostgresql)")
        }
        let port = components.port ?? 5432
        guard (1...65535).contains(port) else { throw LabConfigProblem("port \(port) is not a TCP port") }
        let database = String(components.path.drop { $0 == "/" })
        guard !database.isEmpty, !database.contains("/") else {
            throw LabConfigProblem("the URL names no database: write postgresql://USER@HOST:PORT/DATABASE")
        }
        var tls = TLSMode.prefer
        for item in components.queryItems ?? [] {
            switch item.name {
            case "sslmode":
                guard let mode = item.value.flatMap(TLSMode.init(rawValue:)) else {
                    throw LabConfigProblem("sslmode=\(item.value ?? "") is not one of disable, prefer, require, verify-full")
                }
                tls = mode
            case "password":
                throw LabConfigProblem(Self.passwordInURL)
            default:
                throw LabConfigProblem("unknown URL parameter \(item.name) (only sslmode is understood)")
            }
        }
        let endpoint: Endpoint = host.hasPrefix("/") ? .unixSocket(directory: host, port: port) : .tcp(host: host, port: port)
        if case .unixSocket = endpoint, tls != .prefer, tls != .disable {
            throw LabConfigProblem("sslmode=\(tls.rawValue) over a Unix socket: a socket has no TLS")
        }
        return LabLedgerConfig(endpoint: endpoint, user: user, database: database, tls: tls, passwordFile: passwordFile, unitBlock: unitBlock)
    }

    /// The password to log in with, read now (so a changed file counts at the next connection):
    /// nil when neither file has one (the server may trust this user, or use peer auth).
    public func password() throws(LabConfigProblem) -> String? {
        if let passwordFile {
            let text = try Self.readSecret(passwordFile, what: "ledger_password_file")
            guard let first = text.split(separator: "\n", omittingEmptySubsequences: false).first.map(String.init),
                  !first.trimmingCharacters(in: .whitespaces).isEmpty else {
                throw LabConfigProblem("the password file \(passwordFile) is empty: put the database password on its first line")
            }
            return first.hasSuffix("\r") ? String(first.dropLast()) : first
        }
        guard let pgpass = Self.pgpassPath, FileManager.default.fileExists(atPath: pgpass) else { return nil }
        return try Self.pgpassLookup(try Self.readSecret(pgpass, what: "password file"), for: self)
    }

    /// `$PGPASSFILE`, else `~/.pgpass` (HOME, as libpq looks).
    static var pgpassPath: String? {
        let env = ProcessInfo.processInfo.environment
        if let file = env["PGPASSFILE"], !file.isEmpty { return file }
        return env["HOME"].map { ($0 as NSString).appendingPathComponent(".pgpass") }
    }

    /// A file that holds a secret: readable, and not readable by group or others (libpq
    /// ignores such a .pgpass; a password any local user can read is no secret).
    static func readSecret(_ path: String, what: String) throws(LabConfigProblem) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            let why = errno == ENOENT ? "no such file" : String(cString: strerror(errno))
            throw LabConfigProblem("cannot read the \(what) \(path): \(why)")
        }
        guard st.st_mode & S_IFMT == S_IFREG else { throw LabConfigProblem("the \(what) \(path) is not a regular file") }
        if st.st_mode & 0o077 != 0 {
            throw LabConfigProblem("the \(what) \(path) can be read by others (mode \(String(st.st_mode & 0o777, radix: 8))): chmod 600 it")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LabConfigProblem("cannot read the \(what) \(path): permission denied (the daemon reads it as root)")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw LabConfigProblem("the \(what) \(path) is not UTF-8 text") }
        return text
    }

    /// libpq's rules: the first line whose five fields match (`*` matches anything; `\:` and
    /// `\\` escape), `localhost` matching a Unix socket too.
    static func pgpassLookup(_ text: String, for config: LabLedgerConfig) throws(LabConfigProblem) -> String? {
        let (host, port): (String, Int) = switch config.endpoint {
        case .tcp(let h, let p): (h, p)
        case .unixSocket(_, let p): ("localhost", p)
        }
        let wanted = [host, String(port), config.database, config.user]
        for line in text.split(whereSeparator: \.isNewline) where !line.hasPrefix("#") {
            var fields: [String] = [], field = "", escaped = false
            for c in line {
                if escaped { field.append(c); escaped = false } else if c == "\\" { escaped = true } else if c == ":" && fields.count < 4 {
                    fields.append(field); field = ""
                } else { field.append(c) }
            }
            fields.append(field)
            guard fields.count == 5 else { continue }
            if zip(fields.prefix(4), wanted).allSatisfy({ $0 == "*" || $0 == $1 }) { return fields[4] }
        }
        return nil
    }
}

public struct LabConfigProblem: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
