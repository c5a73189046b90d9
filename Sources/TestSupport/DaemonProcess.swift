// The real provisiond, started from this checkout's build (.build/debug) for integration
// tests and benchmarks.
//
// The daemon is a child of the test process: spawned with posix_spawn (stdin /dev/null,
// stdout and stderr appended to a log file, descriptors above 2 closed so that no card a
// test holds open leaks into it), reaped with waitpid. `stop()` sends SIGTERM and falls back
// to SIGKILL; `kill()` is SIGKILL, for tests of a crash. deinit kills a daemon still
// running, so a failing test never leaves one behind — but tests should call `stop()` in a
// `defer` rather than rely on when deinit runs.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public struct DaemonProcessError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public final class DaemonProcess: Sendable {
    public let configPath: String
    public let socketPath: String
    /// provisiond's stdout and stderr (appended to across restarts).
    public let logPath: String
    private let process = Mutex<pid_t?>(nil)

    /// This checkout's build products: $PROVISION_BIN_DIR, else <repo>/.build/debug.
    public static var binDirectory: String {
        if let dir = ProcessInfo.processInfo.environment["PROVISION_BIN_DIR"], !dir.isEmpty { return dir }
        let root = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug").path
    }

    public static var daemonBinary: String { binDirectory + "/provisiond" }
    public static var cliBinary: String { binDirectory + "/provision" }

    /// Starts `provisiond --config configPath --socket socketPath` and waits until
    /// `provision status` answers on the socket. Throws (with the daemon's log) when the
    /// daemon exits or does not answer within `timeout`; the process is killed then.
    /// `launcher` runs the daemon through a program that execs it (same process), e.g.
    /// `prlimit --nofile=1024:1024 --` to start it under systemd's default descriptor limit.
    public init(configPath: String, socketPath: String, logPath: String, extraArguments: [String] = [],
                launcher: [String] = [], timeout: Duration = .seconds(30)) throws {
        self.configPath = configPath
        self.socketPath = socketPath
        self.logPath = logPath
        for binary in [Self.daemonBinary, Self.cliBinary] where access(binary, X_OK) != 0 {
            throw DaemonProcessError(description: "\(binary) is missing: run `swift build --build-tests` first (or set PROVISION_BIN_DIR)")
        }
        let pid = try Self.spawn(launcher + [Self.daemonBinary, "--config", configPath, "--socket", socketPath] + extraArguments, logPath: logPath)
        process.withLock { $0 = pid }
        do {
            try waitUntilAnswering(timeout: timeout)
        } catch {
            kill()
            throw error
        }
    }

    deinit { kill() }

    /// The daemon's process id while it runs.
    public var pid: pid_t? { process.withLock { $0 } }

    /// Runs the CLI against this daemon's socket: `provision ARGS --socket SOCKET`.
    /// `prefix` runs it through another program, e.g. `setpriv --reuid=nobody …`.
    @discardableResult
    public func cli(_ arguments: [String], prefix: [String] = [], timeout: Duration = .seconds(60)) throws -> CommandOutput {
        try Command.run(prefix + [Self.cliBinary] + arguments + ["--socket", socketPath], timeout: timeout)
    }

    /// SIGTERM (a graceful stop: running jobs are cancelled and recorded), SIGKILL when the
    /// daemon has not exited after `timeout`. Returns the exit status as a shell reports it
    /// (128 + signal when killed), nil when it was not running. Idempotent.
    @discardableResult
    public func stop(timeout: Duration = .seconds(20)) -> Int32? {
        process.withLock { slot -> Int32? in
            guard let pid = slot else { return nil }
            defer { slot = nil }
            Glibc.kill(pid, SIGTERM)
            let deadline = ContinuousClock.now.advanced(by: timeout)
            while ContinuousClock.now < deadline {
                if let status = Self.reap(pid, blocking: false) { return status }
                usleep(20_000)
            }
            Glibc.kill(pid, SIGKILL)
            return Self.reap(pid, blocking: true)
        }
    }

    /// SIGKILL, as a crash or the OOM killer would: nothing is cleaned up, the socket file
    /// stays behind, jobs stay "writing" in the ledger. Idempotent.
    @discardableResult
    public func kill() -> Int32? {
        process.withLock { slot -> Int32? in
            guard let pid = slot else { return nil }
            defer { slot = nil }
            Glibc.kill(pid, SIGKILL)
            return Self.reap(pid, blocking: true)
        }
    }

    /// The log so far, for failure messages.
    public var log: String {
        (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "(no log at \(logPath))"
    }

    // MARK: - Private

    private func waitUntilAnswering(timeout: Duration) throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var last: CommandOutput?
        while ContinuousClock.now < deadline {
            let exited = process.withLock { slot -> Int32? in
                guard let pid = slot, let status = Self.reap(pid, blocking: false) else { return nil }
                slot = nil
                return status
            }
            if let exited {
                throw DaemonProcessError(description: "provisiond exited with status \(exited) before answering on \(socketPath); log:\n\(log)")
            }
            let output = try cli(["status"], timeout: .seconds(10))
            if output.succeeded { return }
            last = output
            usleep(50_000)
        }
        throw DaemonProcessError(description: "provisiond does not answer `provision status` on \(socketPath) after \(timeout) "
            + "(last: \(last.map(\.description) ?? "none")); log:\n\(log)")
    }

    /// Exit status of `pid` once it ended (nil while it runs, when not blocking).
    private static func reap(_ pid: pid_t, blocking: Bool) -> Int32? {
        var raw: Int32 = 0
        while true {
            let result = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
            if result == pid { break }
            if result == 0 { return nil }
            if errno == EINTR { continue }
            return -1  // not our child any more (ECHILD): nothing to wait for
        }
        let signal = raw & 0x7f
        return signal == 0 ? (raw >> 8) & 0xff : 128 + signal
    }

    private static func spawn(_ arguments: [String], logPath: String) throws -> pid_t {
        let log = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard log >= 0 else {
            throw DaemonProcessError(description: "cannot open \(logPath): \(String(cString: strerror(errno)))")
        }
        defer { close(log) }
        // Not under systemd: no socket activation, no sd_notify, plain log lines on stderr.
        var environment = ProcessInfo.processInfo.environment
        for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"] {
            environment.removeValue(forKey: key)
        }
        // The daemon must start with default dispositions of the signals it handles.
        switch Command.spawn(arguments[0], arguments, environment: environment, stdin: nil, stdout: log, stderr: log,
                             defaultSignals: [SIGPIPE, SIGTERM, SIGINT, SIGHUP]) {
        case .success(let pid): return pid
        case .failure(let failure):
            throw DaemonProcessError(description: "cannot start \(arguments[0]): \(String(cString: strerror(failure.code)))")
        }
    }
}
