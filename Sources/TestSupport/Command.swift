// Running the real peers (losetup, udevadm, e2fsck, mkpasswd, …) from tests.
//
// posix_spawn with stdout and stderr sent to unlinked temporary files rather than pipes:
// a child that daemonizes (systemd-udevd --daemon) keeps its copy of stdout open forever,
// and a reader waiting for EOF on a pipe would hang. With files the call returns as soon
// as the direct child exits. File descriptors above 2 are closed in the child, so a test
// that holds a card open O_EXCL in one thread cannot leak that descriptor into a udevd
// started by another (a leaked descriptor keeps a loop device busy forever).

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// What a finished command left behind.
public struct CommandOutput: Sendable, CustomStringConvertible {
    /// The command line, for messages.
    public let arguments: [String]
    /// Exit status; 128 + N when the child was killed by signal N (as a shell reports it).
    public let status: Int32
    public let stdout: String
    public let stderr: String
    /// True when the command was killed because it ran past its timeout.
    public let timedOut: Bool

    public var succeeded: Bool { status == 0 && !timedOut }

    public var description: String {
        var text = "`\(arguments.joined(separator: " "))` exited with status \(status)"
        if timedOut { text += " (killed after its timeout)" }
        let err = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        if !err.isEmpty { text += "; stderr: \(err)" }
        return text
    }
}

/// A command that could not be started, or that failed when success was required.
public struct CommandError: Error, CustomStringConvertible, Sendable {
    public let arguments: [String]
    /// Set when the command ran and failed.
    public let output: CommandOutput?
    /// Set when the command could not be started (errno of posix_spawn or of a file it needed).
    public let errno: Int32?

    public var description: String {
        if let output { return output.description }
        let reason = errno.map { String(cString: strerror($0)) } ?? "unknown error"
        return "could not run `\(arguments.joined(separator: " "))`: \(reason)"
    }
}

public enum Command {
    /// Runs `arguments[0]` (looked up in PATH, plus /usr/sbin and /sbin, which a test runner's
    /// PATH may lack) and waits for it. A non-zero exit is not an error here: look at
    /// `status`, or call `check` instead.
    ///
    /// - Parameters:
    ///   - input: bytes written to the child's stdin (stdin is /dev/null when nil).
    ///   - environment: variables added to (or replacing those of) this process's environment.
    ///   - timeout: the child is killed with SIGKILL after this long.
    @discardableResult
    public static func run(
        _ arguments: [String], input: String? = nil, environment: [String: String] = [:],
        timeout: Duration? = nil
    ) throws -> CommandOutput {
        precondition(!arguments.isEmpty, "Command.run needs at least the program name")
        guard let executable = resolve(arguments[0]) else {
            throw CommandError(arguments: arguments, output: nil, errno: ENOENT)
        }
        let stdoutFile = try TemporaryOutput(arguments)
        defer { stdoutFile.close() }
        let stderrFile = try TemporaryOutput(arguments)
        defer { stderrFile.close() }
        let stdinFile = try TemporaryOutput(arguments)
        defer { stdinFile.close() }
        if let input {
            try stdinFile.write(input, arguments)
        }

        var merged = ProcessInfo.processInfo.environment
        merged["PATH"] = searchPath.joined(separator: ":")
        for (key, value) in environment { merged[key] = value }
        let pid: pid_t
        switch spawn(executable, arguments, environment: merged, stdin: input != nil ? stdinFile.fd : nil,
                     stdout: stdoutFile.fd, stderr: stderrFile.fd) {
        case .success(let p): pid = p
        case .failure(let spawned): throw CommandError(arguments: arguments, output: nil, errno: spawned.code)
        }
        let (status, timedOut) = wait(for: pid, timeout: timeout)
        return CommandOutput(
            arguments: arguments, status: status, stdout: stdoutFile.contents(),
            stderr: stderrFile.contents(), timedOut: timedOut)
    }

    /// Like `run`, but a non-zero exit (or a timeout) throws a `CommandError` that quotes
    /// the command line and its stderr.
    @discardableResult
    public static func check(
        _ arguments: [String], input: String? = nil, environment: [String: String] = [:],
        timeout: Duration? = nil
    ) throws -> CommandOutput {
        let output = try run(arguments, input: input, environment: environment, timeout: timeout)
        guard output.succeeded else {
            throw CommandError(arguments: arguments, output: output, errno: nil)
        }
        return output
    }

    /// Runs a bash script (`set -euo pipefail` first), for the few pipelines tests need.
    @discardableResult
    public static func bash(_ script: String, timeout: Duration? = nil) throws -> CommandOutput {
        try check(["bash", "-c", "set -euo pipefail\n" + script], timeout: timeout)
    }

    /// Full path of a program, or nil when it is nowhere in the search path.
    public static func resolve(_ program: String) -> String? {
        if program.contains("/") {
            return access(program, X_OK) == 0 ? program : nil
        }
        for directory in searchPath {
            let candidate = directory + "/" + program
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    static var searchPath: [String] {
        var directories = (ProcessInfo.processInfo.environment["PATH"] ?? "")
            .split(separator: ":").map(String.init)
        for extra in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        where !directories.contains(extra) {
            directories.append(extra)
        }
        return directories
    }

    private static func wait(for pid: pid_t, timeout: Duration?) -> (Int32, Bool) {
        var raw: Int32 = 0
        var timedOut = false
        if let timeout {
            let deadline = ContinuousClock.now.advanced(by: timeout)
            while true {
                let result = waitpid(pid, &raw, WNOHANG)
                if result == pid { break }
                if result == -1 && errno != EINTR { return (-1, false) }
                if ContinuousClock.now >= deadline {
                    kill(pid, SIGKILL)
                    timedOut = true
                    while waitpid(pid, &raw, 0) == -1 && errno == EINTR {}
                    break
                }
                usleep(5_000)
            }
        } else {
            while waitpid(pid, &raw, 0) == -1 {
                if errno != EINTR { return (-1, false) }
            }
        }
        // WIFEXITED / WEXITSTATUS / WTERMSIG are macros Swift cannot import.
        let signal = raw & 0x7f
        let status = signal == 0 ? (raw >> 8) & 0xff : 128 + signal
        return (status, timedOut)
    }

    /// Starts `executable` with exactly `environment`, stdin from `stdin` (or /dev/null),
    /// stdout and stderr to the given descriptors, nothing else inherited, and default
    /// handling of `defaultSignals` (the test runner ignores SIGPIPE, and an ignored SIGPIPE
    /// survives exec: a `dd | sha256sum` would then misbehave). Returns the pid or the errno.
    static func spawn(
        _ executable: String, _ arguments: [String], environment: [String: String],
        stdin: Int32?, stdout: Int32, stderr: Int32, defaultSignals: [Int32] = [SIGPIPE]
    ) -> Result<pid_t, SpawnFailure> {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdin {
            posix_spawn_file_actions_adddup2(&actions, stdin, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        // posix_spawn_file_actions_addclosefrom_np (glibc 2.34) is declared only under
        // _GNU_SOURCE, which Swift's Glibc module does not define: look it up at run time.
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3)
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in defaultSignals { sigaddset(&defaults, signal) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        return rc == 0 ? .success(pid) : .failure(SpawnFailure(code: rc))
    }
}

/// posix_spawn's error number.
struct SpawnFailure: Error {
    let code: Int32
}

/// An unlinked temporary file that collects one stream of a child.
private final class TemporaryOutput {
    let fd: Int32

    init(_ arguments: [String]) throws {
        var template = Array("/tmp/provision-command-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw CommandError(arguments: arguments, output: nil, errno: errno) }
        // Not inherited by children spawned from other threads (each child gets its own
        // copy through dup2, which clears the flag).
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        self.fd = fd
    }

    func write(_ text: String, _ arguments: [String]) throws {
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CommandError(arguments: arguments, output: nil, errno: errno)
            }
            written += n
        }
        lseek(fd, 0, SEEK_SET)
    }

    func contents() -> String {
        var data = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        var offset: off_t = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            data.append(contentsOf: buffer[0..<n])
            offset += off_t(n)
        }
        return String(decoding: data, as: UTF8.self)
    }

    func close() { Glibc.close(fd) }
}
