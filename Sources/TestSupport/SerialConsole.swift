// A virtual machine's serial console, driven like `expect`: QEMU (through images/boot-in-qemu)
// is a child of the test process with its stdin and stdout on pipes; the test waits for text
// with a deadline (the pipe polled, the task yielding between polls) and types lines.
//
// Everything the machine printed is kept in `transcript`, so a failed expectation shows the
// boot log and the conversation up to that point.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public struct SerialConsoleError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public final class SerialConsole: Sendable {
    private struct State {
        var pid: pid_t?
        var input: Int32 = -1
        var output: Int32 = -1
        /// Everything read so far.
        var transcript: [UInt8] = []
        /// Where the next `expect` starts looking.
        var cursor = 0
    }
    private let state = Mutex(State())
    public let arguments: [String]
    /// When the machine was started, for the boot time in messages.
    public let started = ContinuousClock.now

    /// Starts `arguments` (e.g. `images/boot-in-qemu CARD`) with stdin and stdout+stderr on
    /// pipes.
    public init(_ arguments: [String], environment: [String: String] = [:]) throws {
        self.arguments = arguments
        guard let executable = Command.resolve(arguments[0]) else {
            throw SerialConsoleError(description: "\(arguments[0]) not found")
        }
        var toChild: [Int32] = [0, 0], fromChild: [Int32] = [0, 0]
        // pipe2 is declared only under _GNU_SOURCE; close-on-exec right after is enough here,
        // as Command.spawn also closes every descriptor above 2 in its children.
        guard pipe(&toChild) == 0 else { throw SerialConsoleError(description: "pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&fromChild) == 0 else {
            close(toChild[0]); close(toChild[1])
            throw SerialConsoleError(description: "pipe: \(String(cString: strerror(errno)))")
        }
        for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var merged = ProcessInfo.processInfo.environment
        for (key, value) in environment { merged[key] = value }
        merged["PATH"] = (merged["PATH"] ?? "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        let spawned = Command.spawn(executable, arguments, environment: merged, stdin: toChild[0], stdout: fromChild[1], stderr: fromChild[1])
        close(toChild[0]); close(fromChild[1])
        switch spawned {
        case .success(let pid):
            state.withLock { $0.pid = pid; $0.input = toChild[1]; $0.output = fromChild[0] }
        case .failure(let failure):
            close(toChild[1]); close(fromChild[0])
            throw SerialConsoleError(description: "cannot start \(arguments.joined(separator: " ")): \(String(cString: strerror(failure.code)))")
        }
    }

    deinit { stop() }

    /// Everything the machine printed so far.
    public var transcript: String { state.withLock { String(decoding: $0.transcript, as: UTF8.self) } }

    /// Waits until one of `patterns` appears after the previous match; returns its index and
    /// the text from the previous match up to and including this one. Throws, with the
    /// transcript's tail, when `timeout` passes or the machine exits first.
    ///
    /// Async, and it never blocks a thread: a boot takes minutes on a loaded machine, and a
    /// test blocked in poll(2) for that long would hold one of the few threads of Swift's
    /// cooperative pool that every other suite running beside it needs. The pipe is polled
    /// without waiting; between polls the task sleeps 20 ms (a condition polled with a
    /// deadline, not a guess at how long something takes).
    @discardableResult
    public func expect(_ patterns: [String], timeout: Duration, _ what: String? = nil) async throws -> (index: Int, text: String) {
        try await offPool { try self.expectBlocking(patterns, timeout: timeout, what) }
    }

    /// A dialogue: for each step, waits for its prompt, then types its reply, all on one
    /// thread of its own. The guest's programs time out (busybox login gives the whole
    /// exchange, user name and password, 60 s): replies typed from the concurrency pool,
    /// which a full test run starves, came too late (seen). Each reply waits 0.2 s after its
    /// prompt, as a person would: login prints "Password: " before it turns echo off.
    /// A step without a reply only waits for its text (a "Login incorrect" between attempts:
    /// login's 60 s span several attempts, so they belong to one dialogue).
    public func converse(_ steps: [(prompt: String, reply: String?)], timeout: Duration, _ what: String? = nil) async throws {
        try await offPool {
            for step in steps {
                _ = try self.expectBlocking([step.prompt], timeout: timeout, what ?? "\"\(step.prompt)\"")
                guard let reply = step.reply else { continue }
                usleep(200_000)
                try self.sendLine(reply)
            }
        }
    }

    /// `expect` on the calling thread: polls the console every 20 ms.
    func expectBlocking(_ patterns: [String], timeout: Duration, _ what: String?) throws -> (index: Int, text: String) {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        let needles = patterns.map { Array($0.utf8) }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let found = state.withLock { s -> (Int, String)? in
                var best: (index: Int, end: Int)?
                for (index, needle) in needles.enumerated() {
                    if let at = Self.find(needle, in: s.transcript, from: s.cursor), best == nil || at + needle.count < best!.end {
                        best = (index, at + needle.count)
                    }
                }
                guard let best else { return nil }
                let text = String(decoding: s.transcript[s.cursor..<best.end], as: UTF8.self)
                s.cursor = best.end
                return (best.index, text)
            }
            if let found { return found }
            guard ContinuousClock.now < deadline else {
                throw failure("timed out after \(timeout) waiting for \(what ?? patterns.map { "\"\($0)\"" }.joined(separator: " or "))")
            }
            let fd = state.withLock { $0.output }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, 0)
            if ready < 0, errno == EINTR { continue }
            guard ready > 0 else {
                usleep(20_000)
                continue
            }
            let count = read(fd, &buffer, buffer.count)
            if count < 0, errno == EINTR || errno == EAGAIN { continue }
            guard count > 0 else {
                throw failure("the machine exited while waiting for \(what ?? patterns.map { "\"\($0)\"" }.joined(separator: " or "))")
            }
            state.withLock { $0.transcript += buffer[0..<count] }
        }
    }

    /// `expect` for one pattern.
    @discardableResult
    public func expect(_ pattern: String, timeout: Duration, _ what: String? = nil) async throws -> String {
        try await expect([pattern], timeout: timeout, what).text
    }

    /// Types `text` followed by a carriage return, as a terminal's Enter key sends it.
    public func sendLine(_ text: String) throws {
        let bytes = Array((text + "\r").utf8)
        let fd = state.withLock { $0.input }
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw failure("cannot type into the console: \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    /// Kills the machine (SIGKILL: its disk is a throw-away snapshot) and reaps it; closes
    /// both pipes. Idempotent.
    public func stop() {
        state.withLock { s in
            if let pid = s.pid {
                kill(pid, SIGKILL)
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                s.pid = nil
            }
            if s.input >= 0 { close(s.input); s.input = -1 }
            if s.output >= 0 { close(s.output); s.output = -1 }
        }
    }

    private func failure(_ message: String) -> SerialConsoleError {
        let tail = String(transcript.suffix(4000))
        return SerialConsoleError(description: "\(message) (\(ContinuousClock.now - started) after `\(arguments.joined(separator: " "))` started); console so far:\n\(tail)")
    }

    private static func find(_ needle: [UInt8], in haystack: [UInt8], from start: Int) -> Int? {
        guard !needle.isEmpty, haystack.count - start >= needle.count else { return nil }
        var i = start
        while i + needle.count <= haystack.count {
            if haystack[i] == needle[0], haystack[i..<(i + needle.count)].elementsEqual(needle) { return i }
            i += 1
        }
        return nil
    }
}
