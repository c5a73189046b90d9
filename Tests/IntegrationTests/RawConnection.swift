// The control socket without the CLI: bytes in, lines out, so that tests can send what the
// CLI never would (broken JSON, unknown methods, endless lines).

#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation

/// A Unix socket of `type` (SOCK_STREAM, SOCK_DGRAM), close-on-exec, that `attach` (bind or
/// connect, named by `verb` in errors) took to `path`; the caller closes it.
private func unixSocket(_ path: String, type: Int32, _ verb: String, _ attach: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32) throws -> Int32 {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw BenchError("socket path too long: \(path)") }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    let fd = socket(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw BenchError("socket: \(String(cString: strerror(errno)))") }
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { attach(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
    guard rc == 0 else {
        let e = errno
        Glibc.close(fd)
        throw BenchError("\(verb) \(path): \(String(cString: strerror(e)))")
    }
    return fd
}

/// A Unix socket of `type` bound at `path`, close-on-exec; the caller closes it. (Closed at
/// once, it leaves the socket file a killed daemon leaves.)
func boundUnixSocket(_ path: String, type: Int32) throws -> Int32 {
    try unixSocket(path, type: type, "bind") { bind($0, $1, $2) }
}

final class RawConnection {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String) throws {
        fd = try unixSocket(path, type: Int32(SOCK_STREAM.rawValue), "connect") { connect($0, $1, $2) }
    }

    deinit { Glibc.close(fd) }

    /// Sends everything, or as much as the daemon takes before it closes the connection.
    /// Returns the number of bytes sent.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Int {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                break  // EPIPE / ECONNRESET: the daemon hung up
            }
            offset += n
        }
        return offset
    }

    func send(_ text: String) { send(Array(text.utf8)) }

    /// The next line, or nil at end of stream. Throws after `timeout` without a line.
    func readLine(timeout: Duration = .seconds(10)) throws -> String? {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                return line
            }
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw BenchError("no line from the daemon within \(timeout)") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
            let ready = poll(&pfd, 1, max(1, ms))
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }

    /// The next line decoded as a server message.
    func readMessage(timeout: Duration = .seconds(10)) throws -> ServerMessage {
        guard let line = try readLine(timeout: timeout) else { throw BenchError("the daemon closed the connection instead of answering") }
        do { return try LineCodec.decode(ServerMessage.self, from: Data(line.utf8)) } catch {
            throw BenchError("unreadable line from the daemon: \(line.prefix(300)) (\(error))")
        }
    }
}
