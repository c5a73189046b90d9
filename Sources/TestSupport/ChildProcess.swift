// A long-running peer for a test (`provision board`, chromedriver): spawned like the
// daemon (stdin /dev/null, stdout and stderr appended to a log file, no descriptor leaked),
// waited on by polling its log for a line, stopped with SIGTERM then SIGKILL, reaped.
// deinit kills one still running, but tests should `stop()` it in a `defer`.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public final class ChildProcess: Sendable {
    public let arguments: [String]
    public let logPath: String
    private let process = Mutex<pid_t?>(nil)

    public init(_ arguments: [String], logPath: String, environment: [String: String] = [:]) throws {
        self.arguments = arguments
        self.logPath = logPath
        let log = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard log >= 0 else { throw CommandError(arguments: arguments, output: nil, errno: errno) }
        defer { close(log) }
        guard let executable = Command.resolve(arguments[0]) else { throw CommandError(arguments: arguments, output: nil, errno: ENOENT) }
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        switch Command.spawn(executable, arguments, environment: env, stdin: nil, stdout: log, stderr: log,
                             defaultSignals: [SIGPIPE, SIGTERM, SIGINT, SIGHUP]) {
        case .success(let pid): process.withLock { $0 = pid }
        case .failure(let failure): throw CommandError(arguments: arguments, output: nil, errno: failure.code)
        }
    }

    deinit { stop(timeout: .seconds(2)) }

    public var pid: pid_t? { process.withLock { $0 } }

    /// What the process wrote so far.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// True while the process has not exited.
    public var isRunning: Bool {
        process.withLock { slot in
            guard let pid = slot else { return false }
            var raw: Int32 = 0
            if waitpid(pid, &raw, WNOHANG) == pid { slot = nil; return false }
            return true
        }
    }

    /// Polls the log until a line contains `text`; returns that line. Throws with the log
    /// when the process exits first or the time runs out.
    @discardableResult
    public func waitForLine(containing text: String, timeout: Duration = .seconds(30)) throws -> String {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while ContinuousClock.now < deadline {
            if let line = log.split(separator: "\n").first(where: { $0.contains(text) }) { return String(line) }
            guard isRunning else {
                throw CommandError(arguments: arguments, output: CommandOutput(arguments: arguments, status: -1, stdout: "", stderr: "exited before printing \"\(text)\"; log:\n\(log)", timedOut: false), errno: nil)
            }
            usleep(20_000)
        }
        throw CommandError(arguments: arguments, output: CommandOutput(arguments: arguments, status: -1, stdout: "", stderr: "no line with \"\(text)\" after \(timeout); log:\n\(log)", timedOut: true), errno: nil)
    }

    /// SIGTERM, then SIGKILL after `timeout`; returns the exit status as a shell reports it
    /// (nil when it was not running). Idempotent.
    @discardableResult
    public func stop(timeout: Duration = .seconds(10)) -> Int32? {
        process.withLock { slot -> Int32? in
            guard let pid = slot else { return nil }
            defer { slot = nil }
            kill(pid, SIGTERM)
            let deadline = ContinuousClock.now.advanced(by: timeout)
            var raw: Int32 = 0
            while ContinuousClock.now < deadline {
                let r = waitpid(pid, &raw, WNOHANG)
                if r == pid { return Self.status(raw) }
                if r < 0 && errno != EINTR { return -1 }
                usleep(20_000)
            }
            kill(pid, SIGKILL)
            while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
            return Self.status(raw)
        }
    }

    private static func status(_ raw: Int32) -> Int32 {
        let signal = raw & 0x7f
        return signal == 0 ? (raw >> 8) & 0xff : 128 + signal
    }

    /// A TCP port on 127.0.0.1 that was free a moment ago (for peers that cannot be told to
    /// pick one themselves, like chromedriver).
    public static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CommandError(arguments: ["socket"], output: nil, errno: errno) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw CommandError(arguments: ["bind"], output: nil, errno: errno) }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
