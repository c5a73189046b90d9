#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation

/// The CLI's side of the control socket: a plain blocking Unix socket, one JSON line out,
/// one line back. Exit statuses follow sysexits: 69 daemon unreachable, 77 permission
/// denied, 65 bad request, 66 not found, 75 conflict/refused.
public final class ControlClient {
    public let path: String
    private let fd: Int32
    private var buffer = Data()
    private var nextID = 1
    /// The daemon's greeting: protocol version, station name, and what this user may do.
    public private(set) var greeting = Hello(daemon: "", station: "", access: "")

    public static func socketPath(_ option: String?) -> String {
        option ?? ProcessInfo.processInfo.environment["PROVISION_SOCKET"] ?? ControlProtocol.defaultSocketPath
    }

    /// How long the greeting and each reply may take (not a `watch`'s events, which come when
    /// cards do): a socket that never answers (not provisiond's, or a daemon stopped with
    /// SIGSTOP) is an error, not a command that hangs.
    public var replyTimeout: Duration

    public init(path: String, replyTimeout: Duration = .seconds(30)) throws {
        self.path = path
        self.replyTimeout = replyTimeout
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        self.fd = fd
        guard fd >= 0 else { throw CLIError.unreachable("cannot create a socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw CLIError.badRequest("socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        if rc != 0 {
            let e = errno
            if e == EACCES { throw CLIError.permission("no permission to open \(path): join the socket's group (provision) or use sudo") }
            throw CLIError.unreachable("cannot reach provisiond at \(path): \(String(cString: strerror(e))) — is it running? (systemctl status provisiond, or --socket PATH / PROVISION_SOCKET)")
        }
        let first = try readMessage(within: replyTimeout, waitingFor: "its greeting")
        // A daemon serving its limit of clients says so instead of greeting.
        if let refusal = first.error { throw CLIError(refusal) }
        guard let h = first.hello else { throw CLIError.unreachable("\(path) did not greet like provisiond") }
        guard h.protocolVersion == ControlProtocol.version else {
            throw CLIError.unreachable("provisiond speaks protocol \(h.protocolVersion), this provision speaks \(ControlProtocol.version): upgrade one of them")
        }
        greeting = h
    }

    deinit { close(fd) }

    /// Ends a blocking `nextEvent`/`call` in another thread: it throws `unreachable`.
    /// The descriptor itself is closed by deinit only, so it cannot be reused meanwhile.
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// Sends a request and returns its result, or throws the daemon's error as a CLIError.
    public func call(_ method: Method, _ params: Request.Params? = nil) throws -> ResultPayload {
        let id = nextID
        nextID += 1
        var line = try LineCodec.encode(Request(id: id, method: method, params: params))
        try line.withUnsafeMutableBytes { raw in
            var off = 0
            while off < raw.count {
                // MSG_NOSIGNAL: a daemon that hung up is an error to report, not SIGPIPE.
                let n = send(fd, raw.baseAddress! + off, raw.count - off, Int32(MSG_NOSIGNAL))
                if n < 0 { if errno == EINTR { continue }; throw CLIError.unreachable("provisiond closed the connection") }
                off += n
            }
        }
        let deadline = ContinuousClock.now + replyTimeout
        while true {
            let m = try readMessage(within: deadline - ContinuousClock.now, waitingFor: "its reply to \(method.rawValue)")
            if m.event != nil { continue }
            if let e = m.error { throw CLIError(e) }
            if let r = m.result { return r }
        }
    }

    /// `call`, and the one field of the result that `method` answers with. A reply without
    /// it (a provisiond of another version, or not provisiond) is an error, not a crash.
    public func call<T>(_ method: Method, _ params: Request.Params? = nil, returning field: KeyPath<ResultPayload, T?>) throws -> T {
        guard let value = try call(method, params)[keyPath: field] else {
            throw CLIError.unreachable("provisiond's reply to \(method.rawValue) at \(path) holds no result: a provisiond of another version?")
        }
        return value
    }

    /// The next event of a `watch`. Throws when the daemon ends the watch with an error (a
    /// client too slow for the state changes is told so, then disconnected).
    public func nextEvent() throws -> Event? {
        while true {
            let m = try readMessage()
            if let e = m.event { return e }
            if let e = m.error { throw CLIError(e) }
        }
    }

    /// The next message; with `within`, throws `unreachable` when none has come by then.
    public func readMessage(within timeout: Duration? = nil, waitingFor what: String = "a message") throws -> ServerMessage {
        let deadline = timeout.map { ContinuousClock.now + $0 }
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = buffer[buffer.startIndex..<nl]
                buffer.removeSubrange(buffer.startIndex...nl)
                do { return try LineCodec.decode(ServerMessage.self, from: Data(line)) } catch {
                    throw CLIError.unreachable("provisiond sent something unreadable: \(error)")
                }
            }
            if let deadline {
                let left = deadline - ContinuousClock.now
                let ms = max(0, Int32(clamping: left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = poll(&p, 1, ms)
                if ready < 0 && errno == EINTR { continue }
                if ready == 0 {
                    throw CLIError.unreachable("\(path) did not send \(what) within \(replyTimeout): is it provisiond's socket, and is the daemon running (not stopped)? (--timeout SECONDS waits longer)")
                }
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw CLIError.unreachable("provisiond closed the connection") }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }
}

public struct CLIError: Error, CustomStringConvertible {
    public let message: String
    public let status: Int32
    public var description: String { message }

    public static func unreachable(_ m: String) -> CLIError { CLIError(message: m, status: 69) }
    public static func permission(_ m: String) -> CLIError { CLIError(message: m, status: 77) }
    public static func badRequest(_ m: String) -> CLIError { CLIError(message: m, status: 65) }

    public init(message: String, status: Int32) { self.message = message; self.status = status }

    public init(_ e: ErrorPayload) {
        message = e.message
        switch e.code {
        case .permissionDenied: status = 77
        case .badRequest, .unknownMethod: status = 65
        case .notFound: status = 66
        case .refused, .conflict, .tooSlow: status = 75
        case .internalError: status = 70
        }
    }
}
