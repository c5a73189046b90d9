#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// What the daemon tells systemd through NOTIFY_SOCKET (a datagram socket the test binds,
    /// where systemd's would be): READY once it answers, and STATUS at each job's change of
    /// state — not at each of its progress reports.
    @Suite("sd_notify")
    struct SystemdNotifyTests {
        @Test("READY=1, then one STATUS per change of a job's state, none for its progress reports")
        func statusAtEachChangeOfState() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let path = bench.directory + "/notify.sock"
            let fd = try boundUnixSocket(path, type: Int32(SOCK_DGRAM.rawValue))
            defer { close(fd) }

            // 8 MiB at 2 MB/s: four seconds of writing, a progress report each second.
            try bench.writeConfig([.init(name: "N1", image: try bench.image("notify.img", bytes: 8 << 20))])
            let card = try bench.card(slot: "N1", size: 64 << 20)
            try card.throttle(writeBytesPerSecond: 2_000_000)
            try bench.startDaemon(launcher: ["/usr/bin/env", "NOTIFY_SOCKET=\(path)"])
            _ = try bench.waitForStatus("N1 done", timeout: .seconds(300)) { $0.slot("N1")?.job?.state == .done }

            var messages: [String] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
                if n <= 0 { break }
                messages.append(String(decoding: buffer[0..<n], as: UTF8.self))
            }
            #expect(messages.first?.hasPrefix("READY=1") == true, "\(messages)")
            let statuses = messages.filter { $0.hasPrefix("STATUS=") && $0.contains("; job ") }
            let states = statuses.compactMap { $0.split(separator: " ").last.map(String.init) }
            #expect(states.contains("writing") && states.last == "done", "\(statuses)")
            // Each state once: the progress reports of the four seconds of writing said nothing.
            #expect(zip(states, states.dropFirst()).allSatisfy { $0 != $1 }, "\(statuses)")
        }
    }
}
