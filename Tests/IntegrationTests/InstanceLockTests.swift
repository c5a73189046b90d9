#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// One daemon per ledger and cache (issue 13, point 6): two real daemons on one bench.
    @Suite("one daemon per ledger and cache")
    struct InstanceLockTests {
        @Test("a second daemon on the same ledger and cache exits 75 naming the first one's PID, and leaves its cache alone")
        func secondDaemonOnSameLedgerExits() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "L1", image: try bench.image("small.img", bytes: 1 << 20))])
            let first = try bench.startDaemon()
            let pid = try #require(first.pid)
            // A cache entry of the first daemon's: a second one would empty the directory.
            let entry = bench.directory + "/cache/in-use.img"
            try Data("first daemon's cache".utf8).write(to: URL(fileURLWithPath: entry))

            let secondLog = bench.directory + "/second.log"
            #expect(throws: DaemonProcessError.self) {
                try DaemonProcess(configPath: bench.configPath, socketPath: bench.directory + "/second.sock", logPath: secondLog, timeout: .seconds(20))
            }
            let log = (try? String(contentsOfFile: secondLog, encoding: .utf8)) ?? ""
            #expect(log.contains("provisiond: the ledger \(bench.ledgerPath) is in use by another provisiond (pid \(pid))"), "\(log)")
            #expect(log.contains("one daemon per ledger and cache"), "\(log)")
            #expect(FileManager.default.fileExists(atPath: entry), "the second daemon emptied the first one's cache")
            #expect(try bench.cli(["status"]).status == 0, "the first daemon goes on")
            #expect(first.pid == pid)

            // The exit status, as a service manager sees it.
            let direct = try Command.run([DaemonProcess.daemonBinary, "--config", bench.configPath, "--socket", bench.directory + "/third.sock"], timeout: .seconds(20))
            #expect(direct.status == 75, "\(direct)")
            #expect(direct.stderr.contains("(pid \(pid))"), "\(direct.stderr)")
        }

        @Test("a second daemon with its own ledger but the same cache directory is refused too")
        func sharedCacheIsRefused() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "L2", image: try bench.image("small.img", bytes: 1 << 20))])
            let first = try bench.startDaemon()
            let pid = try #require(first.pid)
            let otherConfig = bench.directory + "/other.toml"
            let text = try String(contentsOfFile: bench.configPath, encoding: .utf8)
                .replacingOccurrences(of: bench.ledgerPath, with: bench.directory + "/other-ledger.sqlite")
            try text.write(toFile: otherConfig, atomically: true, encoding: .utf8)
            let second = try Command.run([DaemonProcess.daemonBinary, "--config", otherConfig, "--socket", bench.directory + "/other.sock"], timeout: .seconds(20))
            #expect(second.status == 75, "\(second)")
            #expect(second.stderr.contains("the image cache \(bench.directory)/cache is in use by another provisiond (pid \(pid))"), "\(second.stderr)")
        }

        @Test("once the first daemon stops, or is killed, a second one starts on the same ledger")
        func lockIsReleasedWhenTheHolderEnds() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "L3", image: try bench.image("small.img", bytes: 1 << 20))])
            let first = try bench.startDaemon()
            #expect(first.stop() == 0)
            let second = try bench.startDaemon()
            // SIGKILL leaves nothing to clean up: the kernel drops a dead process's flocks.
            second.kill()
            let third = try bench.startDaemon()
            #expect(try bench.cli(["status"]).status == 0)
            #expect(third.pid != nil)
        }
    }
}
