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

    public init(path: String) throws {
        self.path = path
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
        let first = try readMessage()
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
        while true {
            let m = try readMessage()
            if m.event != nil { continue }
            if let e = m.error { throw CLIError(e) }
            if let r = m.result { return r }
        }
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

    public func readMessage() throws -> ServerMessage {
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = buffer[buffer.startIndex..<nl]
                buffer.removeSubrange(buffer.startIndex...nl)
                do { return try LineCodec.decode(ServerMessage.self, from: Data(line)) } catch {
                    throw CLIError.unreachable("provisiond sent something unreadable: \(error)")
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
