#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TestSupport

/// `provision board --listen 127.0.0.1:0` against a bench's socket, as a child process;
/// `prefix` runs it as another user (setpriv). The port is the one the board prints.
final class BoardUnderTest: Sendable {
    let process: ChildProcess
    /// http://127.0.0.1:PORT
    let url: String
    let port: Int

    init(bench: StationBench, socketPath: String? = nil, listen: String = "127.0.0.1:0", prefix: [String] = [],
         name: String = "board") throws {
        let logPath = bench.directory + "/\(name).log"
        process = try ChildProcess(prefix + [DaemonProcess.cliBinary, "board", "--listen", listen, "--socket", socketPath ?? bench.socketPath],
                                   logPath: logPath)
        do {
            let line = try process.waitForLine(containing: "serving http://")
            guard let start = line.range(of: "http://"), let end = line[start.upperBound...].firstIndex(of: "/") else {
                throw BenchError("the board printed no address: \(line)")
            }
            let hostPort = String(line[start.upperBound..<end])
            guard let port = hostPort.split(separator: ":").last.flatMap({ Int($0) }) else { throw BenchError("no port in \(line)") }
            self.port = port
            url = "http://" + hostPort
        } catch {
            process.stop()
            throw error
        }
    }

    deinit { process.stop() }

    func stop() { process.stop() }

    var log: String { process.log }

    /// One HTTP request by curl: status code and body.
    func request(_ method: String = "GET", _ path: String, body: String? = nil, host: String? = nil) throws -> (status: Int, body: String) {
        let base = host.map { "http://\($0):\(port)" } ?? url
        var arguments = ["curl", "-s", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}"]
        if let body { arguments += ["-H", "Content-Type: application/json", "--data-binary", body] }
        arguments.append(base + path)
        let output = try Command.run(arguments, timeout: .seconds(20))
        let text = output.stdout
        guard let split = text.lastIndex(of: "\n"), let code = Int(text[text.index(after: split)...]) else {
            throw BenchError("curl \(method) \(path): \(output)")
        }
        return (code, String(text[..<split]))
    }

    /// The page's snapshot, as /state.json gives it.
    func state() throws -> [String: Any] {
        let (status, body) = try request("GET", "/state.json")
        guard status == 200, let object = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else {
            throw BenchError("/state.json answered \(status): \(body)")
        }
        return object
    }

    /// Polls /state.json until `condition` holds.
    @discardableResult
    func waitForState(_ what: String, timeout: Duration = .seconds(300), until condition: ([String: Any]) -> Bool) throws -> [String: Any] {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var last: [String: Any] = [:]
        while ContinuousClock.now < deadline {
            last = try state()
            if condition(last) { return last }
            usleep(100_000)
        }
        throw BenchError("timed out after \(timeout) waiting for the board to show \(what); last state: \(last)\nboard log:\n\(log)")
    }
}
