// Hostile control clients for the bounded-clients tests (issue 13, point 3): a separate
// process, run as `nobody` in the socket's group (a reader, not an admin, as an untrusted
// member of the provision group would be), that opens
//  - `pipeliners` connections that each send `burst` status requests and never read, and
//  - `idle` connections that read their first line (hello or refusal) and then do nothing,
// reports what it got, holds everything open until told, and reports which pipelining
// connections the daemon had closed.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import TestSupport

final class ClientFlood {
    struct Ready: Decodable {
        var admitted: Int
        var refused: Int
        var reasons: [String]
        var unexpected: [String]
    }

    struct Done: Decodable {
        var pipelinersDropped: Int
    }

    private let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private let errors = Pipe()
    private var buffer = Data()

    static let script = #"""
        import json, select, socket, sys
        path, pipeliners, idle, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

        def first_line(s):
            s.settimeout(60)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\n", 1)[0]

        requests = b"".join(b'{"id":%d,"method":"status"}\n' % i for i in range(burst))
        piped = []
        for _ in range(pipeliners):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.setblocking(False)
            try:
                s.send(requests)          # as much as the socket takes; never read
            except OSError:
                pass
            piped.append(s)

        held, refused, unexpected = [], [], []
        for _ in range(idle):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            line = first_line(s)
            try:
                message = json.loads(line)
            except ValueError:
                unexpected.append(line.decode(errors="replace")[:200])
                s.close()
                continue
            if "hello" in message:
                held.append(s)
            elif message.get("error"):
                refused.append(message["error"]["code"] + ": " + message["error"]["message"])
                s.close()
            else:
                unexpected.append(line.decode(errors="replace")[:200])
                s.close()

        print(json.dumps({"admitted": len(held), "refused": len(refused),
                          "reasons": sorted(set(refused)), "unexpected": unexpected[:5]}), flush=True)
        sys.stdin.readline()
        dropped = 0
        for s in piped:
            p = select.poll()
            p.register(s, select.POLLRDHUP)
            if p.poll(0):
                dropped += 1
        print(json.dumps({"pipelinersDropped": dropped}), flush=True)
        for s in piped + held:
            s.close()
        """#

    /// Starts the flood; returns once every connection is open (or refused).
    init(socketPath: String, pipeliners: Int, idle: Int, burst: Int) throws {
        let gid = try getGID("provision")
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        process.arguments = ["--reuid=nobody", "--regid=nogroup", "--groups=\(gid)", "/usr/bin/python3", "-c", Self.script,
                             socketPath, "\(pipeliners)", "\(idle)", "\(burst)"]
        process.standardInput = input
        process.standardOutput = output
        process.standardError = errors
        try process.run()
    }

    deinit {
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }

    /// The report printed once every connection is open.
    func ready(timeout: Duration = .seconds(180)) throws -> Ready {
        try decode(Ready.self, try line(timeout: timeout))
    }

    /// Lets every connection go; returns how many pipelining ones the daemon had closed.
    func release(timeout: Duration = .seconds(60)) throws -> Done {
        input.fileHandleForWriting.write(Data("go\n".utf8))
        let done = try decode(Done.self, try line(timeout: timeout))
        process.waitUntilExit()
        return done
    }

    private func decode<T: Decodable>(_ type: T.Type, _ line: String) throws -> T {
        do { return try JSONDecoder().decode(type, from: Data(line.utf8)) } catch {
            throw BenchError("the flood printed \(line.prefix(300)): \(error)")
        }
    }

    private func line(timeout: Duration) throws -> String {
        let fd = output.fileHandleForReading.fileDescriptor
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                return line
            }
            guard ContinuousClock.now < deadline else { throw BenchError("the flood reported nothing within \(timeout)") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, 500) <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                process.waitUntilExit()
                let stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                throw BenchError("the flood exited (status \(process.terminationStatus)) before reporting: \(stderr.suffix(2000))")
            }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }
}

/// Samples the daemon from another client while something else goes on: every `interval`,
/// a fresh root connection (hello, `status`, reply) timed from connect to reply, and the
/// daemon's open descriptors and resident memory.
final class DaemonSampler: Sendable {
    struct Samples: Sendable {
        var latencies: [Duration] = []
        var failures: [String] = []
        var maxDescriptors = 0
        var maxResidentKiB = 0
    }

    private let samples = Mutex(Samples())
    private let stopped = Atomic(false)
    private let finished = Mutex<Bool>(false)

    init(socketPath: String, pid: pid_t, interval: Duration = .milliseconds(50)) {
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                let start = ContinuousClock.now
                var failure: String?
                var phase = "connect"
                do {
                    let connection = try RawConnection(path: socketPath)
                    phase = "hello"
                    let hello = try connection.readMessage(timeout: .seconds(10))
                    if hello.hello == nil { failure = "no hello: \(String(describing: hello.error))" } else {
                        phase = "status"
                        connection.send("{\"id\":1,\"method\":\"status\"}\n")
                        let reply = try connection.readMessage(timeout: .seconds(10))
                        if reply.result?.status == nil { failure = "no status: \(String(describing: reply.error))" }
                    }
                } catch {
                    failure = "\(Date()) \(phase): \(error)"
                }
                let elapsed = ContinuousClock.now - start
                let fds = daemonDescriptors(pid)
                let rss = (try? residentKiB(pid)) ?? 0
                samples.withLock { s in
                    if let failure { s.failures.append(failure) } else { s.latencies.append(elapsed) }
                    s.maxDescriptors = max(s.maxDescriptors, fds)
                    s.maxResidentKiB = max(s.maxResidentKiB, rss)
                }
                let left = interval - (ContinuousClock.now - start)
                if left > .zero { Thread.sleep(forTimeInterval: Double(left.components.attoseconds) / 1e18 + Double(left.components.seconds)) }
            }
            finished.withLock { $0 = true }
        }
        thread.start()
    }

    /// Stops sampling (waits for the sample in flight) and returns what was measured.
    func stop() -> Samples {
        stopped.store(true, ordering: .relaxed)
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        while !finished.withLock({ $0 }) && ContinuousClock.now < deadline { usleep(10_000) }
        return samples.withLock { $0 }
    }
}

extension DaemonSampler.Samples {
    /// The latency below which `fraction` of the samples fall.
    func percentile(_ fraction: Double) -> Duration {
        let sorted = latencies.sorted()
        guard !sorted.isEmpty else { return .zero }
        return sorted[min(sorted.count - 1, Int(Double(sorted.count) * fraction))]
    }
}

func milliseconds(_ d: Duration) -> Double {
    Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}

/// Open descriptors of a process (entries of /proc/PID/fd).
func daemonDescriptors(_ pid: pid_t) -> Int {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
}

/// VmRSS of a process, in KiB.
func residentKiB(_ pid: pid_t) throws -> Int {
    let text = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
          let kib = Int(line.split(separator: " ").dropFirst().first ?? "") else {
        throw BenchError("no VmRSS in /proc/\(pid)/status")
    }
    return kib
}
